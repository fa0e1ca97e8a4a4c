package cdrguard.peer;

import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.HexFormat;
import java.util.regex.Matcher;
import java.util.regex.Pattern;
import javax.crypto.Mac;
import javax.crypto.spec.SecretKeySpec;

/**
 * The master pseudonym key and the per-purpose HMAC-SHA256 keys derived from it, so that
 * pseudonyms of different purposes cannot be linked. Read from cdrguard's key file (its
 * first {@code [[keys]]} entry, the active key) or given as hex with an id.
 */
public final class PseudonymKey {
    private final String id;
    private final byte[][] purposeKeys = new byte[Purpose.values().length][];

    public PseudonymKey(String id, byte[] master) {
        if (id == null || !id.matches("[A-Za-z0-9_-]{1,15}")) {
            throw new IllegalArgumentException("key id must be 1 to 15 characters of [A-Za-z0-9_-]");
        }
        if (master.length < 16) {
            throw new IllegalArgumentException("key secret must be at least 128 bits");
        }
        this.id = id;
        for (Purpose p : Purpose.values()) {
            purposeKeys[p.ordinal()] = hmac(master,
                    ("cdrguard-streams-peer pseudonym key for " + p.id()).getBytes(StandardCharsets.UTF_8));
        }
    }

    public static PseudonymKey fromHex(String id, String hex) {
        return new PseudonymKey(id, HexFormat.of().parseHex(hex.trim()));
    }

    private static final Pattern ID = Pattern.compile("(?m)^\\s*id\\s*=\\s*\"([^\"]*)\"");
    private static final Pattern SECRET = Pattern.compile("(?m)^\\s*secret_hex\\s*=\\s*\"([0-9a-fA-F]+)\"");

    /** The active (first) key of a cdrguard key file ({@code cdrguard keys generate}). */
    public static PseudonymKey fromKeyFile(Path file) throws IOException {
        String text = Files.readString(file);
        int first = text.indexOf("[[keys]]");
        if (first < 0) {
            throw new IOException(file + ": no [[keys]] entry");
        }
        int next = text.indexOf("[[keys]]", first + 8);
        String entry = text.substring(first, next < 0 ? text.length() : next);
        Matcher id = ID.matcher(entry);
        Matcher secret = SECRET.matcher(entry);
        if (!id.find() || !secret.find()) {
            throw new IOException(file + ": the first [[keys]] entry needs id and secret_hex");
        }
        return fromHex(id.group(1), secret.group(1));
    }

    /** The envelope's key id of a purpose's pseudonyms, e.g. {@code k1.analytics}. */
    public String keyId(Purpose p) {
        return id + "." + p.id();
    }

    /** A new MAC keyed for one purpose; a MAC is not thread safe, so each task has its own. */
    Mac mac(Purpose p) {
        try {
            Mac m = Mac.getInstance("HmacSHA256");
            m.init(new SecretKeySpec(purposeKeys[p.ordinal()], "HmacSHA256"));
            return m;
        } catch (java.security.GeneralSecurityException e) {
            throw new IllegalStateException("HmacSHA256 unavailable", e);
        }
    }

    private static byte[] hmac(byte[] key, byte[] data) {
        try {
            Mac m = Mac.getInstance("HmacSHA256");
            m.init(new SecretKeySpec(key, "HmacSHA256"));
            return m.doFinal(data);
        } catch (java.security.GeneralSecurityException e) {
            throw new IllegalStateException("HmacSHA256 unavailable", e);
        }
    }

    @Override
    public String toString() {
        return "PseudonymKey[" + id + ", secret redacted]";
    }
}
