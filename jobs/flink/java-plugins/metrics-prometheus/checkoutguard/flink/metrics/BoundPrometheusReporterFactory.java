package checkoutguard.flink.metrics;

import java.util.Properties;

import org.apache.flink.metrics.MetricConfig;
import org.apache.flink.metrics.reporter.MetricReporterFactory;
import org.apache.flink.util.PortRange;

/**
 * Creates a {@link BoundPrometheusReporter}: Flink's Prometheus reporter on one address.
 *
 * <p>Configured as {@code metrics.reporter.<name>.factory.class} with {@code host} (default 127.0.0.1)
 * and {@code port} (a port or a range, as Flink's own reporter takes it). Its jar goes beside
 * flink-metrics-prometheus, whose classes it extends: in a plugin folder of a Flink cluster, or on the
 * context class loader of the job's local mini-cluster, which has no plugin manager.
 */
public class BoundPrometheusReporterFactory implements MetricReporterFactory {
    static final String ARG_HOST = "host";
    static final String ARG_PORT = "port";

    @Override
    public BoundPrometheusReporter createMetricReporter(Properties properties) {
        MetricConfig config = (MetricConfig) properties;
        String host = config.getString(ARG_HOST, "127.0.0.1");
        String ports = config.getString(ARG_PORT, "9249");
        return new BoundPrometheusReporter(host, new PortRange(ports));
    }
}
