// Java client of the real-client corpus (tests/tests/corpus.rs), run with
// the JDK's single-source launcher: `java HttpRetry.java URL MAX SECS`.
//
// java.net.http.HttpClient resending one request while the answer is 503,
// without backoff: the client keeps its HTTP/1.1 connection alive, so every
// retry is the identical request on the same connection. Bounded by a count
// and a deadline; prints {"ops","ok","fail","secs"} as one JSON line.
import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.time.Duration;

public class HttpRetry {
    public static void main(String[] args) throws Exception {
        URI uri = URI.create(args[0]);
        int max = Integer.parseInt(args[1]);
        double secs = Double.parseDouble(args[2]);
        // HTTP/1.1 explicitly: the default (HTTP/2) adds an h2c upgrade
        // header to the first plain-text request.
        HttpClient client = HttpClient.newBuilder()
                .version(HttpClient.Version.HTTP_1_1)
                .connectTimeout(Duration.ofSeconds(2))
                .build();
        HttpRequest request = HttpRequest.newBuilder(uri)
                .timeout(Duration.ofSeconds(2))
                .GET()
                .build();
        long t0 = System.nanoTime();
        long end = t0 + (long) (secs * 1e9);
        int ops = 0, ok = 0;
        while (ops < max && System.nanoTime() < end) {
            ops++;
            try {
                HttpResponse<Void> r = client.send(request, HttpResponse.BodyHandlers.discarding());
                if (r.statusCode() < 400) {
                    ok++;
                }
            } catch (java.io.IOException e) {
                // a failed attempt: retried like a 503
            }
        }
        double elapsed = (System.nanoTime() - t0) / 1e9;
        System.out.printf("{\"ops\": %d, \"ok\": %d, \"fail\": %d, \"secs\": %.6f}%n",
                ops, ok, ops - ok, elapsed);
    }
}
