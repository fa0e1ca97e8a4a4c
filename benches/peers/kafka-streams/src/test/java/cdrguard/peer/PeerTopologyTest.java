package cdrguard.peer;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertNotEquals;
import static org.junit.jupiter.api.Assertions.assertNull;
import static org.junit.jupiter.api.Assertions.assertTrue;

import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.ObjectMapper;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.HashMap;
import java.util.List;
import java.util.Map;
import java.util.Properties;
import org.apache.kafka.common.header.Header;
import org.apache.kafka.common.serialization.ByteArrayDeserializer;
import org.apache.kafka.common.serialization.ByteArraySerializer;
import org.apache.kafka.common.serialization.StringSerializer;
import org.apache.kafka.streams.StreamsConfig;
import org.apache.kafka.streams.TestInputTopic;
import org.apache.kafka.streams.TestOutputTopic;
import org.apache.kafka.streams.TopologyTestDriver;
import org.apache.kafka.streams.test.TestRecord;
import org.junit.jupiter.api.AfterEach;
import org.junit.jupiter.api.BeforeEach;
import org.junit.jupiter.params.ParameterizedTest;
import org.junit.jupiter.params.provider.ValueSource;
import org.junit.jupiter.api.Test;

/** Routing, consent and pseudonyms through the real topology, with Kafka Streams' test driver. */
class PeerTopologyTest {
    private static final ObjectMapper JSON = new ObjectMapper();
    private static final long NOW = Rfc3339.parse("2026-01-10T12:00:00.000Z");
    private static final String SECRET = "8f1e2d3c4b5a69788796a5b4c3d2e1f00112233445566778899aabbccddeeff0";

    private TopologyTestDriver driver;
    private TestInputTopic<byte[], byte[]> input;
    private TestInputTopic<String, String> control;
    private final Map<String, TestOutputTopic<byte[], byte[]>> out = new HashMap<>();
    private Path stateDir;
    private Stats stats;

    private static String data(String id, String msisdn) {
        return "{\"record_id\":\"" + id + "\",\"kind\":\"data\",\"msisdn\":\"" + msisdn + "\","
                + "\"imsi\":\"240013000000004\",\"imei\":\"356938034261348\","
                + "\"start_time\":\"2026-01-10T01:09:51.601Z\",\"duration_s\":3600,\"close_cause\":\"partial\","
                + "\"cell\":{\"mcc\":\"240\",\"mnc\":\"01\",\"lac_or_tac\":122,\"cell_id\":1415469},"
                + "\"serving_plmn\":\"24001\",\"apn\":\"internet\",\"charging_id\":621604842,\"rat\":\"lte\","
                + "\"ue_ip\":\"10.64.0.4\",\"usage\":[{\"rating_group\":10,\"ul_bytes\":2629,\"dl_bytes\":176583259}],"
                + "\"recording_entity\":\"pgw-sto-1\",\"local_seq_no\":97}";
    }

    private void start(String store) throws Exception {
        Files.createDirectories(Path.of("target")); stateDir = Files.createTempDirectory(Path.of("target"), "peer-test");
        PeerConfig c = PeerConfig.parse(new String[] {"--bootstrap", "dummy:9092",
                "consent.store=" + store}, Map.of());
        Properties p = c.streamsProperties();
        p.put(StreamsConfig.STATE_DIR_CONFIG, stateDir.toString());
        stats = new Stats();
        driver = new TopologyTestDriver(PeerTopology.build(c, PseudonymKey.fromHex("k1", SECRET), stats, () -> NOW), p);
        input = driver.createInputTopic("cdr.raw", new ByteArraySerializer(), new ByteArraySerializer());
        control = driver.createInputTopic("subscriber.control", new StringSerializer(), new StringSerializer());
        for (String t : List.of("billing", "fraud", "analytics", "marketing", "troubleshooting", "dead-letter")) {
            out.put(t, driver.createOutputTopic("cdr." + t, new ByteArrayDeserializer(), new ByteArrayDeserializer()));
        }
    }

    @BeforeEach
    void setUp() throws Exception {
        start("memory");
    }

    @AfterEach
    void tearDown() {
        if (driver != null) {
            driver.close();
        }
    }

    private void consent(String msisdn, String purpose, boolean granted, String at) {
        control.pipeInput(msisdn + "/consent/" + purpose, "{\"type\":\"consent\",\"msisdn\":\"" + msisdn
                + "\",\"at\":\"" + at + "\",\"purpose\":\"" + purpose + "\",\"granted\":" + granted + "}");
    }

    private void send(String record) {
        input.pipeInput("k".getBytes(StandardCharsets.UTF_8), record.getBytes(StandardCharsets.UTF_8));
    }

    private List<TestRecord<byte[], byte[]>> drain(String route) {
        return out.get(route).readRecordsToList();
    }

    private static JsonNode json(TestRecord<byte[], byte[]> r) throws Exception {
        return JSON.readTree(r.value());
    }

    private static String header(TestRecord<byte[], byte[]> r, String name) {
        Header h = r.headers().lastHeader(name);
        return h == null ? null : new String(h.value(), StandardCharsets.UTF_8);
    }

    private Map<String, Integer> counts() {
        Map<String, Integer> m = new HashMap<>();
        for (String t : out.keySet()) {
            m.put(t, out.get(t).readRecordsToList().size());
        }
        return m;
    }

    @Test
    void consentDecidesTheConsentRoutesAndBillingAlwaysGetsACopy() throws Exception {
        consent("+46701000001", "analytics", true, "2026-01-01T00:00:00.000Z");
        consent("+46701000002", "analytics", false, "2026-01-01T00:00:00.000Z");
        consent("+46701000002", "marketing", true, "2026-01-01T00:00:00.000Z");
        send(data("r-1", "+46701000001"));
        send(data("r-2", "+46701000002"));
        send(data("r-3", "+46701000003"));

        assertEquals(3, drain("billing").size());
        assertEquals(3, drain("fraud").size());
        assertEquals(3, drain("troubleshooting").size());
        List<TestRecord<byte[], byte[]>> analytics = drain("analytics");
        assertEquals(1, analytics.size(), "only the subscriber who granted analytics");
        List<TestRecord<byte[], byte[]>> marketing = drain("marketing");
        assertEquals(1, marketing.size(), "only the subscriber who granted marketing");
        assertEquals("granted", json(analytics.get(0)).at("/envelope/consent").asText());
        assertEquals("+46701000002".length(), 12);
        JsonNode m = json(marketing.get(0));
        assertFalse(m.get("record").has("record_id"), "marketing drops the record id");
        assertTrue(m.at("/envelope/record_id").asText().startsWith("k1.marketing:"));
        assertEquals(3, stats.records.sum());
        assertEquals(3 * 3 + 2, stats.messages());
    }

    @Test
    void copiesCarryTheTreatedRecordAndTheEnvelope() throws Exception {
        consent("+46701000001", "analytics", true, "2026-01-01T00:00:00.000Z");
        send(data("r-1", "+46701000001"));

        TestRecord<byte[], byte[]> billing = drain("billing").get(0);
        JsonNode b = json(billing);
        assertEquals("+46701000001", b.at("/record/msisdn").asText());
        assertEquals("+46701000001", new String(billing.key(), StandardCharsets.UTF_8));
        assertFalse(b.get("record").has("imei") || b.get("record").has("cell") || b.get("record").has("ue_ip"));
        assertEquals("2026-01-10T01:09:51.601Z", b.at("/record/start_time").asText());
        assertEquals("contract", b.at("/envelope/legal_basis").asText());
        assertEquals("not_required", b.at("/envelope/consent").asText());
        assertTrue(b.at("/envelope/key_id").isNull());
        assertEquals("excedo.billing", b.at("/envelope/retention/rule").asText());
        assertEquals("imei=drop,cell=drop,ue_ip=drop", header(billing, "treatments"));
        assertEquals("r-1", header(billing, "record_id"));

        TestRecord<byte[], byte[]> analytics = drain("analytics").get(0);
        JsonNode a = json(analytics);
        String pseudonym = a.at("/record/msisdn").asText();
        assertTrue(pseudonym.matches("k1\\.analytics:[0-9a-f]{32}"), pseudonym);
        assertFalse(new String(analytics.value(), StandardCharsets.UTF_8).contains("46701000001"),
                "no raw msisdn anywhere in an analytics copy");
        assertEquals(pseudonym, new String(analytics.key(), StandardCharsets.UTF_8));
        assertEquals("35693803", a.at("/record/imei").asText());
        assertFalse(a.at("/record/cell").has("cell_id"));
        assertEquals("2026-01-10T01:00:00.000Z", a.at("/record/start_time").asText());
        assertFalse(a.get("record").has("imsi") || a.get("record").has("ue_ip") || a.get("record").has("charging_id"));
        assertEquals("k1.analytics", a.at("/envelope/key_id").asText());
        assertEquals("6(1)(a)", header(analytics, "gdpr_article"));

        // The same subscriber again: the same pseudonym; another purpose's is different.
        consent("+46701000001", "marketing", true, "2026-01-01T00:00:00.000Z");
        send(data("r-2", "+46701000001"));
        assertEquals(pseudonym, json(drain("analytics").get(0)).at("/record/msisdn").asText());
        String marketing = json(drain("marketing").get(0)).at("/record/msisdn").asText();
        assertTrue(marketing.startsWith("k1.marketing:"));
        assertNotEquals(pseudonym.substring(pseudonym.indexOf(':')), marketing.substring(marketing.indexOf(':')));
    }

    @Test
    void rightsStopTheRoutesThePolicySays() throws Exception {
        String m = "+46701000009";
        consent(m, "analytics", true, "2026-01-01T00:00:00.000Z");
        consent(m, "marketing", true, "2026-01-01T00:00:00.000Z");
        control.pipeInput(m + "/objection/marketing",
                "{\"type\":\"objection\",\"msisdn\":\"" + m + "\",\"at\":\"2026-01-02T00:00:00.000Z\",\"purpose\":\"marketing\"}");
        send(data("r-1", m));
        assertEquals(Map.of("billing", 1, "fraud", 1, "analytics", 1, "marketing", 0, "troubleshooting", 1,
                "dead-letter", 0), counts());

        control.pipeInput(m + "/restriction",
                "{\"type\":\"restriction\",\"msisdn\":\"" + m + "\",\"at\":\"2026-01-03T00:00:00.000Z\",\"active\":true}");
        send(data("r-2", m));
        assertEquals(Map.of("billing", 1, "fraud", 1, "analytics", 0, "marketing", 0, "troubleshooting", 0,
                "dead-letter", 0), counts(), "restriction leaves billing and fraud");

        control.pipeInput(m + "/restriction", (String) null); // a tombstone lifts it
        control.pipeInput(m + "/erasure",
                "{\"type\":\"erasure\",\"msisdn\":\"" + m + "\",\"at\":\"2026-01-04T00:00:00.000Z\"}");
        send(data("r-3", m));
        assertEquals(Map.of("billing", 1, "fraud", 1, "analytics", 0, "marketing", 0, "troubleshooting", 0,
                "dead-letter", 0), counts(), "erasure voids earlier consent and stops troubleshooting");

        consent(m, "analytics", true, "2026-01-05T00:00:00.000Z");
        send(data("r-4", m));
        assertEquals(Map.of("billing", 1, "fraud", 1, "analytics", 1, "marketing", 0, "troubleshooting", 0,
                "dead-letter", 0), counts(), "consent given after the erasure lifts it for its purpose");
    }

    @Test
    void anUnreadableControlEventRoutesItsSubscriberFailClosed() {
        String m = "+46701000010";
        consent(m, "analytics", true, "2026-01-01T00:00:00.000Z");
        control.pipeInput(m + "/objection/analytics", "{not json");
        send(data("r-1", m));
        assertEquals(Map.of("billing", 1, "fraud", 1, "analytics", 0, "marketing", 0, "troubleshooting", 0,
                "dead-letter", 0), counts());
        assertEquals(1, stats.failClosed.sum());
    }

    @Test
    void badRecordsGoToTheDeadLetterWithAReasonAndNeverTheValue() {
        send("{\"record_id\":\"x\"");
        send(data("r-1", "+46701000001").replace("\"rat\":\"lte\"", "\"rat\":\"lte\",\"colour\":\"red\""));
        send(data("r-2", "+46701000001").replace("\"local_seq_no\":97", "\"local_seq_no\":\"seven\""));
        send(data("r-3", "070-123 45 67"));
        send(data("r-4", "+46701000001").replace("\"apn\":\"internet\",", ""));
        // No coercion between strings and numbers, either way.
        send(data("r-5", "+46701000001").replace("\"local_seq_no\":97", "\"local_seq_no\":\"97\""));
        send(data("r-6", "+46701000001").replace("\"msisdn\":\"+46701000001\"", "\"msisdn\":46701000001"));
        List<TestRecord<byte[], byte[]>> dead = drain("dead-letter");
        assertEquals(7, dead.size());
        assertEquals(0, drain("billing").size());
        List<String> reasons = dead.stream().map(r -> header(r, "dlq.reason")).toList();
        assertTrue(reasons.get(0).startsWith("malformed json"), reasons.get(0));
        assertEquals("malformed json: unknown field colour", reasons.get(1));
        assertEquals("malformed json: field local_seq_no: wrong type or shape", reasons.get(2));
        assertEquals("invalid record: field msisdn: not an E.164 number", reasons.get(3));
        assertEquals("invalid record: field apn: missing, but this kind of record needs it", reasons.get(4));
        for (String r : reasons) {
            assertFalse(r.contains("seven") || r.contains("123 45"), r);
        }
        assertEquals("cdr.raw", header(dead.get(0), "dlq.topic"));
        assertEquals("{\"record_id\":\"x\"", new String(dead.get(0).value(), StandardCharsets.UTF_8));
        assertNull(header(dead.get(0), "purpose"));
        assertEquals("malformed json: field local_seq_no: wrong type or shape", reasons.get(5));
        assertEquals("malformed json: field msisdn: wrong type or shape", reasons.get(6));
        assertEquals(7, stats.deadLetters.sum());
    }

    @Test
    void outputCarriesTheTimeItWasProducedNotTheInputsTimestamp() {
        // The benchmark's latency probe reads CreateTime; an input hours old must not make
        // its copies look hours late.
        long hourAgo = NOW - 3_600_000L;
        input.pipeInput("k".getBytes(StandardCharsets.UTF_8),
                data("r-1", "+46701000001").getBytes(StandardCharsets.UTF_8), hourAgo);
        input.pipeInput("k".getBytes(StandardCharsets.UTF_8),
                "{\"record_id\":\"x\"".getBytes(StandardCharsets.UTF_8), hourAgo);
        TestRecord<byte[], byte[]> billing = drain("billing").get(0);
        assertEquals(NOW, (long) billing.timestamp());
        assertEquals(NOW, (long) drain("dead-letter").get(0).timestamp());
        // What the probe parses: the first "record_id" of a billing copy is the record's.
        String value = new String(billing.value(), StandardCharsets.UTF_8);
        assertTrue(value.startsWith("{\"record\":{\"record_id\":\"r-1\""), value);
    }

    @ParameterizedTest
    @ValueSource(strings = {"rocksdb", "memory"})
    void bothConsentStoresServeTheLookups(String store) throws Exception {
        driver.close();
        out.clear();
        start(store);
        consent("+46701000001", "analytics", true, "2026-01-01T00:00:00.000Z");
        send(data("r-1", "+46701000001"));
        assertEquals(1, drain("analytics").size());
    }
}
