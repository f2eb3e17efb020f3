package checkoutguard.flink;

import org.apache.flink.api.common.eventtime.Watermark;
import org.apache.flink.api.common.eventtime.WatermarkGenerator;
import org.apache.flink.api.common.eventtime.WatermarkGeneratorSupplier;
import org.apache.flink.api.common.eventtime.WatermarkOutput;
import org.apache.flink.api.common.eventtime.WatermarkStrategy;
import org.apache.flink.types.Row;

/**
 * The control streams (rules, watchlist) carry no event time: their watermark is the end of time from the
 * first periodic emit on, so an operator they are connected to (decide) passes on its main input's
 * watermark instead of being held at the start of time by an input that never sends one.
 */
public class ControlEventTime implements WatermarkStrategy<Row> {
    private static final long serialVersionUID = 1L;

    @Override
    public WatermarkGenerator<Row> createWatermarkGenerator(WatermarkGeneratorSupplier.Context context) {
        return new WatermarkGenerator<Row>() {
            @Override
            public void onEvent(Row row, long timestamp, WatermarkOutput output) {}

            @Override
            public void onPeriodicEmit(WatermarkOutput output) {
                output.emitWatermark(new Watermark(Long.MAX_VALUE));
            }
        };
    }
}
