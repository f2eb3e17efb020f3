package checkoutguard.flink.metrics;

import java.io.IOException;
import java.lang.reflect.Field;
import java.net.InetSocketAddress;
import java.util.Iterator;

import io.prometheus.client.CollectorRegistry;
import io.prometheus.client.exporter.HTTPServer;
import org.apache.flink.metrics.prometheus.AbstractPrometheusReporter;
import org.apache.flink.util.PortRange;

/**
 * Flink's Prometheus reporter (metric names, labels and types exactly as {@code PrometheusReporter}'s),
 * serving {@code /metrics} on one address instead of every interface.
 *
 * <p>Why: Flink 2.2's {@code PrometheusReporter} binds {@code new InetSocketAddress(port)}, the wildcard
 * address, and has no host option; every listener of this project binds {@code CG_BIND_HOST} only. The
 * metric registry it fills is package-private in {@code AbstractPrometheusReporter}, so it is read once
 * here by reflection: a Flink that renames it fails this reporter at start, loudly, not silently.
 */
public class BoundPrometheusReporter extends AbstractPrometheusReporter {
    private final HTTPServer httpServer;
    private final int port;

    BoundPrometheusReporter(String host, PortRange ports) {
        CollectorRegistry registry = registryOf(this);
        HTTPServer started = null;
        int bound = -1;
        IOException last = null;
        for (Iterator<Integer> it = ports.getPortsIterator(); it.hasNext() && started == null; ) {
            int candidate = it.next();
            try {
                // Daemon threads: the reporter never keeps the JVM alive on its own.
                started = new HTTPServer(new InetSocketAddress(host, candidate), registry, true);
                bound = candidate;
            } catch (IOException e) {
                last = e;
            }
        }
        if (started == null) {
            throw new IllegalStateException(
                    "could not serve Prometheus metrics on " + host + ":" + ports + " (taken?)", last);
        }
        this.httpServer = started;
        this.port = bound;
        log.info("Prometheus reporter serves /metrics on {}:{}", host, bound);
    }

    /** The port it serves on. */
    public int getPort() {
        return port;
    }

    @Override
    public void close() {
        httpServer.stop();
        super.close();
    }

    private static CollectorRegistry registryOf(AbstractPrometheusReporter reporter) {
        try {
            Field field = AbstractPrometheusReporter.class.getDeclaredField("registry");
            field.setAccessible(true);
            return (CollectorRegistry) field.get(reporter);
        } catch (ReflectiveOperationException e) {
            throw new IllegalStateException(
                    "this flink-metrics-prometheus has no 'registry' field: update BoundPrometheusReporter", e);
        }
    }
}
