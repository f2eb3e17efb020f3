package checkoutguard.flink;

import java.io.ByteArrayInputStream;
import java.io.ByteArrayOutputStream;
import java.io.DataInputStream;
import java.io.DataOutputStream;
import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.PriorityQueue;

import org.apache.flink.api.common.state.ListState;
import org.apache.flink.api.common.state.ListStateDescriptor;
import org.apache.flink.api.common.typeinfo.PrimitiveArrayTypeInfo;
import org.apache.flink.metrics.Counter;
import org.apache.flink.runtime.state.StateInitializationContext;
import org.apache.flink.runtime.state.StateSnapshotContext;
import org.apache.flink.streaming.api.operators.AbstractStreamOperator;
import org.apache.flink.streaming.api.operators.OneInputStreamOperator;
import org.apache.flink.streaming.api.operators.util.PausableRelativeClock;
import org.apache.flink.streaming.api.watermark.Watermark;
import org.apache.flink.streaming.runtime.streamrecord.StreamRecord;
import org.apache.flink.types.Row;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;

/**
 * Holds the messages for one keyed scoring step until the watermark passes their event time, then sends
 * them, in event-time order, as one batch per shard: each key of the step then meets its messages in the
 * same order whatever the parallelism upstream (partitioned layout, {@code jobs/scoring/partitioned.py}).
 *
 * <p>Input rows (topic, k, v): k is the shard (UTF-8), v starts with the event time (8 bytes, big-endian).
 * A message already behind the watermark (late, or released by a processing-time deadline) goes in the
 * next batch of its shard, at most {@code maxDelayMs} later. Held messages are operator state (any subtask
 * may send any shard: the step is keyed after this); late ones are sent before every checkpoint barrier.
 * After {@code idleMs} without input, whatever is held goes (in order): a lull decides the last messages
 * even where an upstream watermark stopped short of them. That wait is kept on an input-activity clock
 * that stands still while this task is back-pressured (as Flink's own idleness does), and no lull comes in
 * the first {@link StepEventTime#STARTUP_GRACE_MS} after its first input (a TaskManager whose
 * interpreters started later has not sent its first messages yet): a pause of the job's own was a lull on
 * the wall clock, and what came after it was late.
 *
 * <p>Batch out: shard (Java UTF), then per message its v (int length, bytes).
 *
 * <p>Metrics {@code lateMessages} and {@code lullReleases} (and a log line at most once a minute): a late
 * message is taken out of event-time order, so what a key's steps see may then depend on the parallelism;
 * a lull release in the middle of a replay means the job's own pauses passed for a lull
 * ({@code CG_JOB__EVENT_IDLE_MS} too short for the machine).
 */
public class EventTimeBatcher extends AbstractStreamOperator<byte[]> implements OneInputStreamOperator<Row, byte[]> {
    private static final long serialVersionUID = 1L;

    private static final class Held {
        final long time;
        final long seq;
        final String shard;
        final byte[] value;

        Held(long time, long seq, String shard, byte[] value) {
            this.time = time;
            this.seq = seq;
            this.shard = shard;
            this.value = value;
        }
    }

    private final int maxRecords;
    private final long maxDelayMs;
    private transient PriorityQueue<Held> held;
    private transient Map<String, List<byte[]>> late;
    private transient int lateCount;
    private transient boolean timerArmed;
    private transient long seq;
    private transient long watermark;
    private transient ListState<byte[]> heldState;

    private final long idleMs;
    private transient long lastInput;
    private transient boolean lullArmed;

    private static final Logger LOG = LoggerFactory.getLogger(EventTimeBatcher.class);
    private static final long LOG_EVERY_MS = 60_000L;
    private transient PausableRelativeClock activity;
    private transient long startedAt;
    private transient Counter lateMessages;
    private transient Counter lullReleases;
    private transient long lateUnlogged;
    private transient long lateLoggedAt;

    public EventTimeBatcher(int maxRecords, long maxDelayMs, long idleMs) {
        this.maxRecords = Math.max(1, maxRecords);
        this.maxDelayMs = Math.max(0, maxDelayMs);
        this.idleMs = Math.max(1, idleMs);
    }

    @Override
    public void initializeState(StateInitializationContext context) throws Exception {
        super.initializeState(context);
        held = new PriorityQueue<>((a, b) -> a.time != b.time ? Long.compare(a.time, b.time) : Long.compare(a.seq, b.seq));
        late = new LinkedHashMap<>();
        watermark = Long.MIN_VALUE;
        lastInput = Long.MIN_VALUE / 2;
        heldState = context.getOperatorStateStore().getListState(
                new ListStateDescriptor<>("held", PrimitiveArrayTypeInfo.BYTE_PRIMITIVE_ARRAY_TYPE_INFO));
        if (context.isRestored()) {
            for (byte[] frame : heldState.get()) {
                DataInputStream in = new DataInputStream(new ByteArrayInputStream(frame));
                long time = in.readLong();
                String shard = in.readUTF();
                byte[] value = new byte[in.readInt()];
                in.readFully(value);
                held.add(new Held(time, seq++, shard, value));
            }
        }
    }

    @Override
    public void open() throws Exception {
        super.open();
        activity = new PausableRelativeClock(getProcessingTimeService().getClock());
        getContainingTask().getEnvironment().getMetricGroup().getIOMetricGroup().registerBackPressureListener(activity);
        startedAt = Long.MIN_VALUE; // the first input's time: the task runs and one upstream has started
        lastInput = activity.relativeTimeMillis();
        lateMessages = getMetricGroup().counter("lateMessages");
        lullReleases = getMetricGroup().counter("lullReleases");
        lateLoggedAt = Long.MIN_VALUE / 2;
        if (!held.isEmpty()) {
            armLull(); // restored rows go at the next watermark, or in a lull
        }
    }

    @Override
    public void snapshotState(StateSnapshotContext context) throws Exception {
        super.snapshotState(context);
        List<byte[]> frames = new ArrayList<>(held.size());
        List<Held> ordered = new ArrayList<>(held);
        ordered.sort((a, b) -> a.time != b.time ? Long.compare(a.time, b.time) : Long.compare(a.seq, b.seq));
        for (Held h : ordered) {
            ByteArrayOutputStream bytes = new ByteArrayOutputStream(h.value.length + 32);
            DataOutputStream out = new DataOutputStream(bytes);
            out.writeLong(h.time);
            out.writeUTF(h.shard);
            out.writeInt(h.value.length);
            out.write(h.value);
            out.flush();
            frames.add(bytes.toByteArray());
        }
        heldState.update(frames);
    }

    @Override
    public void processElement(StreamRecord<Row> element) throws Exception {
        Row row = element.getValue();
        String shard = new String((byte[]) row.getField(1), StandardCharsets.UTF_8);
        byte[] value = (byte[]) row.getField(2);
        long time = 0L;
        for (int i = 0; i < 8; i++) {
            time = (time << 8) | (value[i] & 0xFF);
        }
        lastInput = activity.relativeTimeMillis();
        if (startedAt == Long.MIN_VALUE) {
            startedAt = lastInput;
        }
        if (time > watermark) {
            held.add(new Held(time, seq++, shard, value));
            armLull();
            return;
        }
        late.computeIfAbsent(shard, s -> new ArrayList<>()).add(value);
        lateCount++;
        lateMessages.inc();
        lateUnlogged++;
        long now = getProcessingTimeService().getCurrentProcessingTime();
        if (now - lateLoggedAt >= LOG_EVERY_MS) {
            LOG.warn("{} message(s) behind the watermark taken as they came (the latest {} ms behind)",
                    lateUnlogged, watermark - time);
            lateUnlogged = 0;
            lateLoggedAt = now;
        }
        if (lateCount >= maxRecords || maxDelayMs == 0) {
            flushLate();
        } else if (!timerArmed) {
            timerArmed = true;
            long due = getProcessingTimeService().getCurrentProcessingTime() + maxDelayMs;
            getProcessingTimeService().registerTimer(due, ts -> {
                timerArmed = false;
                flushLate();
            });
        }
    }

    @Override
    public void processWatermark(Watermark mark) throws Exception {
        flushLate();
        watermark = Math.max(watermark, mark.getTimestamp());
        Map<String, List<byte[]>> ripe = new LinkedHashMap<>();
        while (!held.isEmpty() && held.peek().time <= watermark) {
            Held h = held.poll();
            ripe.computeIfAbsent(h.shard, s -> new ArrayList<>()).add(h.value);
        }
        send(ripe);
        super.processWatermark(mark);
    }

    /**
     * A lull: nothing came for {@code idleMs} while rows are held (upstream went quiet before its watermark
     * reached them). They go now, in order, and count as passed: what comes later and older is late.
     */
    private void armLull() {
        if (lullArmed) {
            return;
        }
        lullArmed = true;
        long due = getProcessingTimeService().getCurrentProcessingTime() + idleMs;
        getProcessingTimeService().registerTimer(due, ts -> {
            lullArmed = false;
            if (held.isEmpty()) {
                return;
            }
            long now = activity.relativeTimeMillis();
            boolean starting = startedAt != Long.MIN_VALUE && now - startedAt < StepEventTime.STARTUP_GRACE_MS;
            if (now - lastInput < idleMs || starting) {
                armLull();
                return;
            }
            lullReleases.inc();
            LOG.info("no input for {} ms: {} held message(s) released", idleMs, held.size());
            Map<String, List<byte[]>> rest = new LinkedHashMap<>();
            while (!held.isEmpty()) {
                Held h = held.poll();
                watermark = Math.max(watermark, h.time);
                rest.computeIfAbsent(h.shard, sh -> new ArrayList<>()).add(h.value);
            }
            send(rest);
        });
    }

    @Override
    public void close() throws Exception {
        if (activity != null) {
            getContainingTask().getEnvironment().getMetricGroup().getIOMetricGroup().unregisterBackPressureListener(activity);
        }
        super.close();
    }

    @Override
    public void prepareSnapshotPreBarrier(long checkpointId) throws Exception {
        flushLate();
    }

    @Override
    public void finish() throws Exception {
        flushLate();
        Map<String, List<byte[]>> rest = new LinkedHashMap<>();
        while (!held.isEmpty()) {
            Held h = held.poll();
            rest.computeIfAbsent(h.shard, s -> new ArrayList<>()).add(h.value);
        }
        send(rest);
        super.finish();
    }

    private void flushLate() throws IOException {
        if (lateCount == 0) {
            return;
        }
        Map<String, List<byte[]>> out = late;
        late = new LinkedHashMap<>();
        lateCount = 0;
        send(out);
    }

    /** One batch per shard, never split: Python orders a batch fully, so equal times stay in the steps' order. */
    private void send(Map<String, List<byte[]>> byShard) throws IOException {
        for (Map.Entry<String, List<byte[]>> entry : byShard.entrySet()) {
            ByteArrayOutputStream bytes = new ByteArrayOutputStream(1 << 12);
            DataOutputStream out = new DataOutputStream(bytes);
            out.writeUTF(entry.getKey());
            for (byte[] v : entry.getValue()) {
                out.writeInt(v.length);
                out.write(v);
            }
            out.flush();
            output.collect(new StreamRecord<>(bytes.toByteArray()));
        }
    }
}
