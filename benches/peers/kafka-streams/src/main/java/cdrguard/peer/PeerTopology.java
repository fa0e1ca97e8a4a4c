package cdrguard.peer;

import java.util.List;
import org.apache.kafka.common.serialization.Serdes;
import org.apache.kafka.common.utils.Bytes;
import org.apache.kafka.streams.StreamsBuilder;
import org.apache.kafka.streams.Topology;
import org.apache.kafka.streams.kstream.Branched;
import org.apache.kafka.streams.kstream.BranchedKStream;
import org.apache.kafka.streams.kstream.Consumed;
import org.apache.kafka.streams.kstream.KStream;
import org.apache.kafka.streams.kstream.Materialized;
import org.apache.kafka.streams.kstream.Named;
import org.apache.kafka.streams.kstream.Produced;
import org.apache.kafka.streams.state.KeyValueStore;
import org.apache.kafka.streams.state.Stores;

/**
 * input ─► route (decode, consent lookups, copies) ─► split ─► cdr.billing, cdr.fraud, ...,
 * cdr.dead-letter; the control topic ─► GlobalKTable "consent-table" (key → latest event).
 */
public final class PeerTopology {
    public static final String CONSENT_STORE = "consent-table";

    private PeerTopology() {}

    public static Topology build(PeerConfig c, PseudonymKey key, Stats stats, RouteProcessor.Clock clock) {
        StreamsBuilder b = new StreamsBuilder();
        Materialized<String, byte[], KeyValueStore<Bytes, byte[]>> store = c.inMemoryStore()
                ? Materialized.as(Stores.inMemoryKeyValueStore(CONSENT_STORE))
                : Materialized.as(CONSENT_STORE);
        b.globalTable(c.controlTopic(), Consumed.with(Serdes.String(), Serdes.ByteArray()),
                store.withKeySerde(Serdes.String()).withValueSerde(Serdes.ByteArray()));

        KStream<byte[], Routed> out = b
                .stream(c.inputTopic(), Consumed.with(Serdes.ByteArray(), Serdes.ByteArray()))
                .process(() -> new RouteProcessor(CONSENT_STORE, key, stats, clock), Named.as("route"));

        Produced<byte[], Routed> produced = Produced.with(Serdes.ByteArray(), Routed.SERDE);
        BranchedKStream<byte[], Routed> split = out.split(Named.as("to-"));
        List<Route> routes = ExcedoPolicy.ROUTES;
        for (int i = 0; i < routes.size(); i++) {
            int target = i;
            String topic = c.routeTopic(routes.get(i).purpose());
            split.branch((k, v) -> v.target() == target,
                    Branched.withConsumer(s -> s.to(topic, produced), routes.get(i).purpose().id()));
        }
        split.defaultBranch(Branched.withConsumer(s -> s.to(c.deadLetterTopic(), produced), "dead-letter"));
        return b.build();
    }
}
