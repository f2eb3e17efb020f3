package checkoutguard.flink;

import org.apache.flink.api.common.functions.FilterFunction;
import org.apache.flink.types.Row;

/** Rows (topic, k, v) for one keyed step ({@code @step}), or with {@code null} for Kafka (no {@code @}). */
public class TopicFilter implements FilterFunction<Row> {
    private static final long serialVersionUID = 1L;

    private final String topic;

    public TopicFilter(String topic) {
        this.topic = topic;
    }

    @Override
    public boolean filter(Row row) {
        Object t = row.getField(0);
        String name = t == null ? "" : t.toString();
        return topic == null ? !name.startsWith("@") : topic.equals(name);
    }
}
