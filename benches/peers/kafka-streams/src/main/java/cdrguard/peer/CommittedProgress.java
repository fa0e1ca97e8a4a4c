package cdrguard.peer;

import java.time.Instant;
import java.util.HashMap;
import java.util.List;
import java.util.Locale;
import java.util.Map;
import java.util.Properties;
import java.util.stream.Collectors;
import org.apache.kafka.clients.admin.Admin;
import org.apache.kafka.clients.admin.AdminClientConfig;
import org.apache.kafka.clients.admin.ListOffsetsResult;
import org.apache.kafka.clients.admin.OffsetSpec;
import org.apache.kafka.clients.consumer.OffsetAndMetadata;
import org.apache.kafka.common.IsolationLevel;
import org.apache.kafka.common.TopicPartition;

/**
 * Watches a consumer group's committed offsets on a topic until they reach the topic's end,
 * and prints the drain rate: input records committed per second from the first commit that
 * moved to the last. Works for any contender (cdrguard, the relay, this peer).
 *
 * <pre>java -cp cdrguard-streams-peer.jar cdrguard.peer.CommittedProgress BOOTSTRAP GROUP TOPIC [TIMEOUT_S]</pre>
 */
public final class CommittedProgress {
    private CommittedProgress() {}

    public static void main(String[] args) throws Exception {
        if (System.getProperty("org.slf4j.simpleLogger.defaultLogLevel") == null) {
            System.setProperty("org.slf4j.simpleLogger.defaultLogLevel", "warn");
        }
        if (args.length < 3) {
            System.err.println("usage: CommittedProgress BOOTSTRAP GROUP TOPIC [TIMEOUT_S]");
            System.exit(2);
        }
        String group = args[1];
        String topic = args[2];
        long timeoutMs = (args.length > 3 ? Long.parseLong(args[3]) : 600) * 1000;
        Properties p = new Properties();
        p.put(AdminClientConfig.BOOTSTRAP_SERVERS_CONFIG, args[0]);
        try (Admin admin = Admin.create(p)) {
            List<TopicPartition> parts = admin.describeTopics(List.of(topic)).allTopicNames().get()
                    .get(topic).partitions().stream()
                    .map(i -> new TopicPartition(topic, i.partition())).toList();
            Map<TopicPartition, OffsetSpec> latest = parts.stream()
                    .collect(Collectors.toMap(tp -> tp, tp -> OffsetSpec.latest()));
            long deadline = System.currentTimeMillis() + timeoutMs;
            long startCommitted = -1;
            long firstMoveAt = -1;
            long lastCommitted = -1;
            long lastMoveAt = -1;
            while (System.currentTimeMillis() < deadline) {
                Map<TopicPartition, ListOffsetsResult.ListOffsetsResultInfo> ends = admin
                        .listOffsets(latest, new org.apache.kafka.clients.admin.ListOffsetsOptions(
                                IsolationLevel.READ_COMMITTED)).all().get();
                long end = ends.values().stream().mapToLong(ListOffsetsResult.ListOffsetsResultInfo::offset).sum();
                Map<TopicPartition, OffsetAndMetadata> committed = new HashMap<>(
                        admin.listConsumerGroupOffsets(group).partitionsToOffsetAndMetadata().get());
                long sum = 0;
                for (TopicPartition tp : parts) {
                    OffsetAndMetadata o = committed.get(tp);
                    sum += o == null ? 0 : o.offset();
                }
                long now = System.currentTimeMillis();
                if (startCommitted < 0) {
                    startCommitted = sum;
                    lastCommitted = sum;
                } else if (sum != lastCommitted) {
                    if (firstMoveAt < 0) {
                        firstMoveAt = lastMoveAt < 0 ? now : lastMoveAt;
                    }
                    lastCommitted = sum;
                    lastMoveAt = now;
                } else if (firstMoveAt < 0) {
                    lastMoveAt = now; // the last poll before the first move
                }
                System.out.println(Instant.ofEpochMilli(now) + " committed=" + sum + " end=" + end);
                if (sum >= end && firstMoveAt >= 0) {
                    double secs = (lastMoveAt - firstMoveAt) / 1000.0;
                    System.out.println(String.format(Locale.ROOT,
                            "drained %d records in %.2f s: %.0f records/s (committed offsets, polled every 250 ms)",
                            sum - startCommitted, secs, (sum - startCommitted) / secs));
                    return;
                }
                Thread.sleep(250);
            }
            System.out.println("timed out before the group reached the end");
            System.exit(1);
        }
    }
}
