//! The telemetry listener: a small HTTP/1.1 server answering `GET /metrics`, `/healthz`
//! and `/readyz`, one response per connection. It runs on a thread and runtime of its
//! own, so a scrape never takes a worker from the pipeline, and a liveness probe still
//! gets an answer (503, saying why) when the pipeline's runtime is wedged.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::TelemetryError;
use super::status::Status;

/// The longest request head read; probes and scrapers send a few hundred bytes.
const MAX_HEAD: usize = 8 * 1024;
/// How long a client may take to send its request or read the answer.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once; more wait in the kernel's backlog.
const MAX_CONNECTIONS: usize = 64;
/// How often the recorder folds histogram samples into their buckets when nobody scrapes
/// (each scrape does it too), so samples never pile up.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// What the server answers from.
pub(super) struct Endpoints {
    pub(super) handle: PrometheusHandle,
    pub(super) status: Arc<Status>,
}

/// A response: status line, content type, body.
struct Response {
    status: &'static str,
    content_type: &'static str,
    body: String,
}

impl Response {
    fn text(status: &'static str, body: impl Into<String>) -> Response {
        Response {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
        }
    }
}

impl Endpoints {
    /// The answer to a request for `path` with `method`.
    fn answer(&self, method: &str, path: &str) -> Response {
        if method != "GET" && method != "HEAD" {
            return Response::text("405 Method Not Allowed", "GET only\n");
        }
        let path = path.split('?').next().unwrap_or(path);
        match path {
            "/metrics" => {
                let mut body = self.handle.render();
                self.status.render_lag(&mut body);
                Response {
                    status: "200 OK",
                    content_type: "text/plain; version=0.0.4; charset=utf-8",
                    body,
                }
            }
            "/healthz" => match self.status.live() {
                Ok(()) => Response::text("200 OK", "ok\n"),
                Err(why) => Response::text("503 Service Unavailable", format!("{why}\n")),
            },
            "/readyz" => match self.status.ready() {
                Ok(()) => Response::text("200 OK", "ready\n"),
                Err(why) => Response::text("503 Service Unavailable", format!("{why}\n")),
            },
            _ => Response::text("404 Not Found", "try /metrics, /healthz or /readyz\n"),
        }
    }
}

/// Binds `listen` now (so a refused address stops the start, and port 0 resolves) and
/// serves on a thread of its own until the process ends. Returns the bound address.
pub(super) fn spawn(
    listen: SocketAddr,
    endpoints: Endpoints,
) -> Result<SocketAddr, TelemetryError> {
    let bind = |source| TelemetryError::Bind {
        addr: listen,
        source,
    };
    let std_listener = std::net::TcpListener::bind(listen).map_err(bind)?;
    std_listener.set_nonblocking(true).map_err(bind)?;
    let addr = std_listener.local_addr().map_err(bind)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(TelemetryError::Runtime)?;
    let endpoints = Arc::new(endpoints);
    std::thread::Builder::new()
        .name("cdrguard-telemetry".into())
        .spawn(move || {
            rt.block_on(async move {
                let listener = match TcpListener::from_std(std_listener) {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::error!(error = %e, "telemetry listener failed; /metrics, /healthz and /readyz are down");
                        return;
                    }
                };
                serve(listener, endpoints).await;
            })
        })
        .map_err(TelemetryError::Runtime)?;
    Ok(addr)
}

async fn serve(listener: TcpListener, endpoints: Arc<Endpoints>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let upkeep = endpoints.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(UPKEEP_EVERY);
        loop {
            tick.tick().await;
            upkeep.handle.run_upkeep();
        }
    });
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        match listener.accept().await {
            Ok((stream, _)) => {
                let endpoints = endpoints.clone();
                tokio::spawn(async move {
                    // A client that goes away or stalls ends only its own connection.
                    let _ = tokio::time::timeout(IO_TIMEOUT, answer(stream, &endpoints)).await;
                    drop(permit);
                });
            }
            Err(e) => {
                // Out of file descriptors, say: wait rather than spin.
                tracing::warn!(error = %e, "telemetry listener: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Reads one request head and writes its response; the connection then closes.
async fn answer(mut stream: TcpStream, endpoints: &Endpoints) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
        if head.len() > MAX_HEAD {
            return write(
                &mut stream,
                &Response::text("431 Request Header Fields Too Large", ""),
                false,
            )
            .await;
        }
    }
    let line = head
        .split(|b| *b == b'\n')
        .next()
        .and_then(|l| std::str::from_utf8(l).ok())
        .unwrap_or("");
    let mut parts = line.split_whitespace();
    let (method, path) = match (parts.next(), parts.next()) {
        (Some(m), Some(p)) => (m, p),
        _ => return write(&mut stream, &Response::text("400 Bad Request", ""), false).await,
    };
    let response = endpoints.answer(method, path);
    write(&mut stream, &response, method == "HEAD").await
}

async fn write(stream: &mut TcpStream, r: &Response, head_only: bool) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n",
        r.status,
        r.content_type,
        r.body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    if !head_only {
        stream.write_all(r.body.as_bytes()).await?;
    }
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(addr: SocketAddr, path: &str) -> (String, String) {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        let (head, body) = out.split_once("\r\n\r\n").unwrap();
        (head.lines().next().unwrap().to_string(), body.to_string())
    }

    #[test]
    fn serves_the_three_paths_and_refuses_others() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let status = Arc::new(Status::default());
        let addr = spawn(
            "127.0.0.1:0".parse().unwrap(),
            Endpoints {
                handle: recorder.handle(),
                status: status.clone(),
            },
        )
        .unwrap();
        metrics::with_local_recorder(&recorder, || {
            metrics::counter!("cdrguard_test_total").increment(3);
        });
        let (line, body) = get(addr, "/metrics");
        assert_eq!(line, "HTTP/1.1 200 OK");
        assert!(body.contains("cdrguard_test_total 3"), "{body}");
        assert_eq!(get(addr, "/healthz").0, "HTTP/1.1 200 OK");
        let (line, body) = get(addr, "/readyz");
        assert_eq!(
            (line.as_str(), body.as_str()),
            ("HTTP/1.1 503 Service Unavailable", "starting\n")
        );
        status.set_readiness(Box::new(|| Ok(())));
        assert_eq!(get(addr, "/readyz?verbose").0, "HTTP/1.1 200 OK");
        assert_eq!(get(addr, "/other").0, "HTTP/1.1 404 Not Found");
    }

    #[test]
    fn an_address_in_use_is_refused_naming_it() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let e = spawn(
            addr,
            Endpoints {
                handle: recorder.handle(),
                status: Arc::new(Status::default()),
            },
        )
        .unwrap_err();
        assert!(e.to_string().contains(&addr.to_string()), "{e}");
    }
}
