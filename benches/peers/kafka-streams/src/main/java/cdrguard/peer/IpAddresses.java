package cdrguard.peer;

import java.net.InetAddress;
import java.net.UnknownHostException;

/** IP address literals: checked and generalised without ever resolving a name. */
final class IpAddresses {
    private IpAddresses() {}

    static boolean isIpv4(String s) {
        int parts = 0;
        int i = 0;
        int n = s.length();
        while (i <= n) {
            int start = i;
            int v = 0;
            while (i < n && s.charAt(i) >= '0' && s.charAt(i) <= '9') {
                v = v * 10 + (s.charAt(i) - '0');
                i++;
                if (i - start > 3) {
                    return false;
                }
            }
            int len = i - start;
            if (len == 0 || v > 255 || (len > 1 && s.charAt(start) == '0')) {
                return false;
            }
            parts++;
            if (i == n) {
                break;
            }
            if (s.charAt(i) != '.') {
                return false;
            }
            i++;
        }
        return parts == 4;
    }

    static boolean isIp(String s) {
        if (isIpv4(s)) {
            return true;
        }
        // Only hex digits, colons and dots reach InetAddress, so it parses a literal and
        // never looks a name up.
        if (s.indexOf(':') < 0 || s.length() > 45) {
            return false;
        }
        for (int i = 0; i < s.length(); i++) {
            char c = s.charAt(i);
            boolean ok = (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F')
                    || c == ':' || c == '.';
            if (!ok) {
                return false;
            }
        }
        try {
            InetAddress.getByName(s);
            return true;
        } catch (UnknownHostException e) {
            return false;
        }
    }
}
