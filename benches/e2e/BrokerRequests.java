// What the broker has served so far, read from its own metrics over JMX: requests by API
// (summed over versions), messages and bytes in and out. The e2e driver (run.py) takes
// one reading before a contender starts and one after it stops, so the difference is
// what that contender asked of the broker.
//
//     java benches/e2e/BrokerRequests.java BROKER_PID
//
// prints one JSON object: {"requests": {"Produce": n, ...}, "messages_in": n,
// "bytes_in": n, "bytes_out": n}. It attaches to the broker's JVM (same user, same host)
// and starts its local management agent, so the broker needs no JMX port.

import com.sun.tools.attach.VirtualMachine;
import java.util.Map;
import java.util.TreeMap;
import javax.management.MBeanServerConnection;
import javax.management.ObjectName;
import javax.management.remote.JMXConnector;
import javax.management.remote.JMXConnectorFactory;
import javax.management.remote.JMXServiceURL;

public class BrokerRequests {
    public static void main(String[] args) throws Exception {
        if (args.length != 1) {
            System.err.println("usage: java BrokerRequests.java BROKER_PID");
            System.exit(2);
        }
        VirtualMachine vm = VirtualMachine.attach(args[0]);
        String address;
        try {
            address = vm.startLocalManagementAgent();
        } finally {
            vm.detach();
        }
        try (JMXConnector c = JMXConnectorFactory.connect(new JMXServiceURL(address))) {
            MBeanServerConnection m = c.getMBeanServerConnection();
            Map<String, Long> requests = new TreeMap<>();
            ObjectName pattern =
                    new ObjectName("kafka.network:type=RequestMetrics,name=RequestsPerSec,*");
            for (ObjectName n : m.queryNames(pattern, null)) {
                long count = ((Number) m.getAttribute(n, "Count")).longValue();
                requests.merge(n.getKeyProperty("request"), count, Long::sum);
            }
            StringBuilder out = new StringBuilder("{\"requests\": {");
            String sep = "";
            for (Map.Entry<String, Long> e : requests.entrySet()) {
                if (e.getValue() == 0) {
                    continue;
                }
                out.append(sep).append('"').append(e.getKey()).append("\": ").append(e.getValue());
                sep = ", ";
            }
            out.append('}');
            for (String[] metric : new String[][] {
                {"messages_in", "MessagesInPerSec"},
                {"bytes_in", "BytesInPerSec"},
                {"bytes_out", "BytesOutPerSec"},
            }) {
                ObjectName n = new ObjectName(
                        "kafka.server:type=BrokerTopicMetrics,name=" + metric[1]);
                long count = ((Number) m.getAttribute(n, "Count")).longValue();
                out.append(", \"").append(metric[0]).append("\": ").append(count);
            }
            System.out.println(out.append('}'));
        }
    }
}
