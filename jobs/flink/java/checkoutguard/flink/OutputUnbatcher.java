package checkoutguard.flink;

import java.io.ByteArrayInputStream;
import java.io.DataInputStream;

import org.apache.flink.api.common.functions.FlatMapFunction;
import org.apache.flink.types.Row;
import org.apache.flink.util.Collector;

/**
 * Unpacks the Python scoring step's output batches into one Row (topic, k, v) per Kafka record.
 *
 * <p>Frame per record (big-endian): topic (Java UTF), key (int length, -1 = null, bytes), value (same).
 */
public class OutputUnbatcher implements FlatMapFunction<byte[], Row> {
    private static final long serialVersionUID = 1L;

    @Override
    public void flatMap(byte[] batch, Collector<Row> out) throws Exception {
        DataInputStream in = new DataInputStream(new ByteArrayInputStream(batch));
        while (in.available() > 0) {
            String topic = in.readUTF();
            byte[] key = readBytes(in);
            byte[] value = readBytes(in);
            out.collect(Row.of(topic, key, value));
        }
    }

    private static byte[] readBytes(DataInputStream in) throws java.io.IOException {
        int len = in.readInt();
        if (len < 0) {
            return null;
        }
        byte[] data = new byte[len];
        in.readFully(data);
        return data;
    }
}
