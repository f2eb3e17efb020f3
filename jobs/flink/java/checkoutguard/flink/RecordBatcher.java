package checkoutguard.flink;

import java.io.ByteArrayOutputStream;
import java.io.DataOutputStream;
import java.io.IOException;
import java.time.Instant;
import java.time.LocalDateTime;
import java.time.ZoneOffset;
import java.util.Map;

import org.apache.flink.streaming.api.operators.AbstractStreamOperator;
import org.apache.flink.streaming.api.operators.OneInputStreamOperator;
import org.apache.flink.streaming.runtime.streamrecord.StreamRecord;
import org.apache.flink.types.Row;

/**
 * Packs Kafka rows (k, v, topic, partition, offset, timestamp, headers) into one byte[] per batch, so the
 * Python scoring step is entered once per batch instead of once per record.
 *
 * <p>Why: crossing from the JVM into Python costs more per record than our scoring itself. A batch
 * is sent when it holds {@code maxRecords} records or 4 MiB, {@code maxDelayMs} after its first record, and
 * before every checkpoint barrier, so no record is ever held across a checkpoint: the operator needs
 * no state, and the source offsets in a checkpoint cover exactly what Python has received.
 *
 * <p>Frame per record (big-endian): key (int length, -1 = null, bytes), value (same), topic
 * (Java UTF), partition (int), offset (long), timestamp in ms (long), the value of the header named
 * {@code header} (as key; -1 when absent: a row without headers, or without that one). One header only:
 * the job reads nothing else of them, and most records carry none.
 */
public class RecordBatcher extends AbstractStreamOperator<byte[]> implements OneInputStreamOperator<Row, byte[]> {
    private static final long serialVersionUID = 1L;
    /** A batch is also sent once it holds this many bytes, so a run of large records stays bounded. */
    static final int MAX_BATCH_BYTES = 4 << 20;

    private final int maxRecords;
    private final long maxDelayMs;
    private final String header;
    private transient ByteArrayOutputStream bytes;
    private transient DataOutputStream out;
    private transient int count;
    private transient boolean timerArmed;

    public RecordBatcher(int maxRecords, long maxDelayMs, String header) {
        this.maxRecords = Math.max(1, maxRecords);
        this.maxDelayMs = Math.max(0, maxDelayMs);
        this.header = header;
    }

    @Override
    public void open() throws Exception {
        super.open();
        bytes = new ByteArrayOutputStream(1 << 16);
        out = new DataOutputStream(bytes);
    }

    @Override
    public void processElement(StreamRecord<Row> element) throws Exception {
        Row row = element.getValue();
        writeBytes((byte[]) row.getField(0));
        writeBytes((byte[]) row.getField(1));
        Object topic = row.getField(2);
        out.writeUTF(topic == null ? "" : topic.toString());
        Object partition = row.getField(3);
        out.writeInt(partition == null ? -1 : ((Number) partition).intValue());
        Object offset = row.getField(4);
        out.writeLong(offset == null ? -1L : ((Number) offset).longValue());
        out.writeLong(epochMillis(row.getField(5)));
        writeBytes(headerValue(row));
        count++;
        if (count >= maxRecords || bytes.size() >= MAX_BATCH_BYTES || maxDelayMs == 0) {
            flush();
        } else if (!timerArmed) {
            // One timer at a time, armed by the first record of a batch. If that batch left early
            // (full, or at a checkpoint), the timer sends whatever came since: early, never late.
            timerArmed = true;
            long due = getProcessingTimeService().getCurrentProcessingTime() + maxDelayMs;
            getProcessingTimeService().registerTimer(due, ts -> {
                timerArmed = false;
                flush();
            });
        }
    }

    @Override
    public void prepareSnapshotPreBarrier(long checkpointId) throws Exception {
        flush();
    }

    /** A watermark never overtakes a record: the end of a bounded input (the last watermark) included. */
    @Override
    public void processWatermark(org.apache.flink.streaming.api.watermark.Watermark mark) throws Exception {
        flush();
        super.processWatermark(mark);
    }

    @Override
    public void finish() throws Exception {
        flush();
        super.finish();
    }

    private void flush() throws IOException {
        if (count == 0) {
            return;
        }
        out.flush();
        byte[] batch = bytes.toByteArray();
        bytes.reset();
        count = 0;
        output.collect(new StreamRecord<>(batch));
    }

    private void writeBytes(byte[] data) throws IOException {
        if (data == null) {
            out.writeInt(-1);
        } else {
            out.writeInt(data.length);
            out.write(data);
        }
    }

    private byte[] headerValue(Row row) {
        if (row.getArity() < 7) {
            return null;
        }
        Object headers = row.getField(6);
        if (!(headers instanceof Map)) {
            return null;
        }
        Object value = ((Map<?, ?>) headers).get(header);
        return value instanceof byte[] ? (byte[]) value : null;
    }

    private static long epochMillis(Object ts) {
        if (ts == null) {
            return 0L;
        }
        if (ts instanceof Instant) {
            return ((Instant) ts).toEpochMilli();
        }
        if (ts instanceof LocalDateTime) {
            return ((LocalDateTime) ts).toInstant(ZoneOffset.UTC).toEpochMilli();
        }
        if (ts instanceof java.sql.Timestamp) {
            return ((java.sql.Timestamp) ts).getTime();
        }
        return ((Number) ts).longValue();
    }
}
