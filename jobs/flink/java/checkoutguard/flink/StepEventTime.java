package checkoutguard.flink;

import org.apache.flink.api.common.eventtime.TimestampAssigner;
import org.apache.flink.api.common.eventtime.TimestampAssignerSupplier;
import org.apache.flink.api.common.eventtime.Watermark;
import org.apache.flink.api.common.eventtime.WatermarkGenerator;
import org.apache.flink.api.common.eventtime.WatermarkGeneratorSupplier;
import org.apache.flink.api.common.eventtime.WatermarkOutput;
import org.apache.flink.api.common.eventtime.WatermarkStrategy;
import org.apache.flink.types.Row;

/**
 * Event time of the partitioned layout's messages (rows topic, k, v; v starts with the event time), and
 * its watermark: the newest event time less {@code boundMs}, or the newest itself once no message came for
 * {@code idleMs} (so the last transactions before a lull are released); an input without a message for
 * {@code idleMs} since it started is idle and holds nothing back. Rows for Kafka (no {@code @} topic) carry no event time.
 */
public class StepEventTime implements WatermarkStrategy<Row> {
    private static final long serialVersionUID = 1L;

    private final long boundMs;
    private final long idleMs;

    public StepEventTime(long boundMs, long idleMs) {
        this.boundMs = Math.max(0, boundMs);
        this.idleMs = Math.max(1, idleMs);
    }

    @Override
    public TimestampAssigner<Row> createTimestampAssigner(TimestampAssignerSupplier.Context context) {
        return (row, previous) -> {
            Object topic = row.getField(0);
            byte[] value = (byte[]) row.getField(2);
            if (topic == null || !topic.toString().startsWith("@") || value == null || value.length < 8) {
                return Long.MIN_VALUE;
            }
            long time = 0L;
            for (int i = 0; i < 8; i++) {
                time = (time << 8) | (value[i] & 0xFF);
            }
            return time;
        };
    }

    @Override
    public WatermarkGenerator<Row> createWatermarkGenerator(WatermarkGeneratorSupplier.Context context) {
        return new WatermarkGenerator<Row>() {
            private long newest = Long.MIN_VALUE;
            private long lastInput = System.currentTimeMillis();

            @Override
            public void onEvent(Row row, long timestamp, WatermarkOutput output) {
                if (timestamp != Long.MIN_VALUE) {
                    newest = Math.max(newest, timestamp);
                    lastInput = System.currentTimeMillis();
                }
            }

            @Override
            public void onPeriodicEmit(WatermarkOutput output) {
                boolean quiet = System.currentTimeMillis() - lastInput >= idleMs;
                if (newest == Long.MIN_VALUE) {
                    if (quiet) {
                        output.markIdle();
                    }
                } else if (quiet) {
                    output.emitWatermark(new Watermark(newest));
                } else {
                    output.emitWatermark(new Watermark(newest - boundMs - 1));
                }
            }
        };
    }
}
