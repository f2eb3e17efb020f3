package checkoutguard.flink;

import org.apache.flink.api.common.eventtime.TimestampAssigner;
import org.apache.flink.api.common.eventtime.TimestampAssignerSupplier;
import org.apache.flink.api.common.eventtime.Watermark;
import org.apache.flink.api.common.eventtime.WatermarkGenerator;
import org.apache.flink.api.common.eventtime.WatermarkGeneratorSupplier;
import org.apache.flink.api.common.eventtime.WatermarkOutput;
import org.apache.flink.api.common.eventtime.WatermarkStrategy;
import org.apache.flink.types.Row;
import org.apache.flink.util.clock.RelativeClock;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;

/**
 * Event time of the partitioned layout's messages (rows topic, k, v; v starts with the event time, 8 bytes,
 * then the source partition it came from, 4 bytes), and its watermark, per source partition as Kafka's own
 * source keeps it: the lowest newest event time over the partitions that sent something in the last
 * {@code idleMs}, less {@code boundMs}. A replay that reads one partition ahead of another then holds the
 * leader back instead of making the laggard late. A partition quiet for {@code idleMs} holds nothing back;
 * once all are quiet the watermark jumps to the newest event (so the last transactions before a lull are
 * released); an input without any message for {@link #STARTUP_GRACE_MS} (at least {@code idleMs}) since its
 * task began running is idle, and none is sent in the first {@code idleMs} after the first message (a
 * backlog's first fetch may hold one partition only). Rows for Kafka (no {@code @} topic) carry no event time.
 *
 * <p>The start's clock begins at the first periodic emit, when the task runs, not when the generator is made:
 * that comes before the chain's Python operators have started their interpreters and read the control topics,
 * which on a loaded machine took longer than {@code idleMs}; a subtask of a TaskManager that started later
 * then counted as idle before its first message, the other subtask's watermark went ahead alone, and its
 * first messages were late (decisions then depended on which TaskManager started first).
 *
 * <p>All of these times are Flink's input-activity clock ({@code getInputActivityClock}), which stands still
 * while the task is back-pressured: a route held up by slower steps downstream sends nothing for a while,
 * and on the wall clock that passed for a lull, released what was held and made the rest of the backlog late.
 */
public class StepEventTime implements WatermarkStrategy<Row> {
    private static final long serialVersionUID = 1L;

    /** Least time a subtask that has sent nothing yet holds the watermark back at the start (see above). */
    public static final long STARTUP_GRACE_MS = 30_000L;

    private static final Logger LOG = LoggerFactory.getLogger(StepEventTime.class);

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
        RelativeClock clock = context.getInputActivityClock(); // stands still while the task is back-pressured
        return new WatermarkGenerator<Row>() {
            private final java.util.Map<Integer, long[]> sources = new java.util.HashMap<>();
            private long started = Long.MIN_VALUE; // the first periodic emit's time (the task runs)
            private long firstInput = Long.MIN_VALUE;
            private boolean quiet = false;

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
                seen[1] = clock.relativeTimeMillis();
                if (firstInput == Long.MIN_VALUE) {
                    firstInput = seen[1];
                }
            }

            @Override
            public void onPeriodicEmit(WatermarkOutput output) {
                long now = clock.relativeTimeMillis();
                if (started == Long.MIN_VALUE) {
                    started = now;
                }
                if (sources.isEmpty()) {
                    if (now - started >= Math.max(idleMs, STARTUP_GRACE_MS)) {
                        if (!quiet) {
                            LOG.info("no message since the start {} ms ago: idle (holds back no other subtask)", now - started);
                            quiet = true;
                        }
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
                    if (!quiet) {
                        LOG.info("no message for {} ms from any of {} source partitions: watermark to the newest event",
                                idleMs, sources.size());
                        quiet = true;
                    }
                    output.emitWatermark(new Watermark(newest)); // all quiet: what came is released ...
                    output.markIdle(); // ... and this subtask holds back no other's (active again with its next)
                } else {
                    quiet = false;
                    output.emitWatermark(new Watermark(lowestActive - boundMs - 1));
                }
            }
        };
    }
}
