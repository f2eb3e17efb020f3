package checkoutguard.flink;

import java.nio.charset.StandardCharsets;

import org.apache.flink.api.java.functions.KeySelector;
import org.apache.flink.types.Row;

/**
 * The shard of a keyed step's message (row topic, k, v: k is the shard): all of one shard's messages then
 * pass the same {@code EventTimeBatcher} subtask, which alone can put them in event-time order.
 */
public class ShardKey implements KeySelector<Row, String> {
    private static final long serialVersionUID = 1L;

    @Override
    public String getKey(Row row) {
        return new String((byte[]) row.getField(1), StandardCharsets.UTF_8);
    }
}
