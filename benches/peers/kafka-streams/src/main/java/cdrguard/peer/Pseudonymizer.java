package cdrguard.peer;

import java.nio.charset.StandardCharsets;
import javax.crypto.Mac;

/**
 * Makes pseudonyms: {@code keyid.purpose:} and the first 128 bits of
 * HMAC-SHA256(purpose key, field name, 0, value) in hex, the shape of cdrguard's (which
 * uses keyed BLAKE3). The field name separates a record id's pseudonym from a msisdn's.
 * One per stream task: it holds MACs, which are not thread safe.
 */
public final class Pseudonymizer {
    private static final char[] HEX = "0123456789abcdef".toCharArray();
    private final PseudonymKey key;
    private final Mac[] macs = new Mac[Purpose.values().length];
    private final String[] prefixes = new String[Purpose.values().length];

    public Pseudonymizer(PseudonymKey key) {
        this.key = key;
        for (Purpose p : Purpose.values()) {
            macs[p.ordinal()] = key.mac(p);
            prefixes[p.ordinal()] = key.keyId(p) + ":";
        }
    }

    public String keyId(Purpose p) {
        return key.keyId(p);
    }

    public String pseudonym(Purpose p, Field f, String value) {
        Mac m = macs[p.ordinal()];
        m.update(f.id().getBytes(StandardCharsets.US_ASCII));
        m.update((byte) 0);
        byte[] h = m.doFinal(value.getBytes(StandardCharsets.UTF_8));
        String prefix = prefixes[p.ordinal()];
        char[] out = new char[prefix.length() + 32];
        prefix.getChars(0, prefix.length(), out, 0);
        int at = prefix.length();
        for (int i = 0; i < 16; i++) {
            out[at++] = HEX[(h[i] >> 4) & 0xf];
            out[at++] = HEX[h[i] & 0xf];
        }
        return new String(out);
    }
}
