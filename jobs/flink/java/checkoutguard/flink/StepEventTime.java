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
 * Event time of the partitioned layout's messages (rows topic, k, v; v starts with the event time, 8 bytes,
 * then the source partition it came from, 4 bytes), and its watermark, per source partition as Kafka's own
 * source keeps it: the lowest newest event time over the partitions that sent something in the last
 * {@code idleMs}, less {@code boundMs}. A replay that reads one partition ahead of another then holds the
 * leader back instead of making the laggard late. A partition quiet for {@code idleMs} holds nothing back;
 * once all are quiet the watermark jumps to the newest event (so the last transactions before a lull are
 * released); an input without any message for {@code idleMs} since it started is idle, and none is sent
 * in the first {@code idleMs} after the first message (a backlog's first fetch may hold one partition only).
 * Rows for Kafka (no {@code @} topic) carry no event time.
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
            private final java.util.Map<Integer, long[]> sources = new java.util.HashMap<>();
            private final long started = System.currentTimeMillis();
            private long firstInput = 0L;

            @Override
            public void onEvent(Row row, long timestamp, WatermarkOutput output) {
                if (timestamp == Long.MIN_VALUE) {
                    return;
                }
                byte[] value = (byte[]) row.getField(2);
                int source = value.length >= 12
                        ? ((value[8] & 0xFF) << 24) | ((value[9] & 0xFF) << 16) | ((value[10] & 0xFF) << 8) | (value[11] & 0xFF)
                        : 0;
                long[] seen = sources.computeIfAbsent(source, s -> new long[] {Long.MIN_VALUE, 0L});
                seen[0] = Math.max(seen[0], timestamp);
                seen[1] = System.currentTimeMillis();
                if (firstInput == 0L) {
                    firstInput = seen[1];
                }
            }

            @Override
            public void onPeriodicEmit(WatermarkOutput output) {
                long now = System.currentTimeMillis();
                if (sources.isEmpty()) {
                    if (now - started >= idleMs) {
                        output.markIdle();
                    }
                    return;
                }
                if (now - firstInput < idleMs) {
                    return; // a backlog's first fetch may hold one partition only: let the others show up
                }
                long lowestActive = Long.MAX_VALUE;
                long newest = Long.MIN_VALUE;
                for (long[] seen : sources.values()) {
                    newest = Math.max(newest, seen[0]);
                    if (now - seen[1] < idleMs) {
                        lowestActive = Math.min(lowestActive, seen[0]);
                    }
                }
                if (lowestActive == Long.MAX_VALUE) {
                    output.emitWatermark(new Watermark(newest)); // all quiet: what came is released ...
                    output.markIdle(); // ... and this subtask holds back no other's (active again with its next)
                } else {
                    output.emitWatermark(new Watermark(lowestActive - boundMs - 1));
                }
            }
        };
    }
}
