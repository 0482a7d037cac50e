//! A real authoritative DNS server for the zone `test.`, on 127.0.0.1:0
//! (UDP, and TCP on the same port), whose records a test changes while a
//! proxy resolves through it. Built on hickory-server's `Server` with a
//! request handler of our own over a shared map, not on a zone file: a test
//! must be able to change an answer, its TTL, or stop answering at all
//! between two queries.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_server::net::runtime::Time;
use hickory_server::proto::op::{Edns, Header, HeaderCounts, Metadata, OpCode, ResponseCode};
use hickory_server::proto::rr::rdata::SOA;
use hickory_server::proto::rr::{LowerName, Name, RData, Record, RecordType};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use hickory_server::Server;

/// The zone this server is authoritative for.
pub const ZONE: &str = "test.";

/// The TTL of the zone's SOA record and its negative-caching TTL (RFC 2308
/// section 5: the lesser of the SOA's TTL and MINIMUM). Short, so that a
/// name a test adds after a miss resolves on the next query.
const NEGATIVE_TTL: u32 = 1;

/// How long a TCP connection may sit idle before the server closes it.
const TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// A DNS server answering A and AAAA queries in the zone `test.` from a map
/// the test controls. Stopped when dropped.
pub struct DnsServer {
    pub addr: SocketAddr,
    state: Arc<State>,
    server: Server<Handler>,
}

#[derive(Default)]
struct State {
    records: Mutex<HashMap<LowerName, (Vec<IpAddr>, u32)>>,
    paused: AtomicBool,
    queries: AtomicU64,
}

impl DnsServer {
    /// An authoritative server for the zone `test.` on 127.0.0.1 at a random
    /// port, over UDP and over TCP on the same port.
    pub async fn start() -> DnsServer {
        let state = Arc::new(State::default());
        let (udp, tcp) = bind_udp_and_tcp().await;
        let addr = udp.local_addr().expect("UDP socket has an address");
        let mut server = Server::new(Handler {
            state: state.clone(),
            zone: LowerName::from(zone()),
        });
        server.register_socket(udp);
        // 32 responses queued per connection, as hickory's own tests do.
        server.register_listener(tcp, TCP_IDLE_TIMEOUT, 32);
        DnsServer {
            addr,
            state,
            server,
        }
    }

    /// Set the A and AAAA records of `name` (e.g. "ping-stable.test."; the
    /// final dot may be left out), replacing any before, with this TTL in
    /// seconds. An empty list removes the name: queries for it then get
    /// NXDOMAIN. Panics on a name outside the zone `test.`.
    pub fn set(&self, name: &str, addrs: &[IpAddr], ttl: u32) {
        let mut fqdn =
            Name::from_ascii(name).unwrap_or_else(|e| panic!("{name:?} is not a DNS name: {e}"));
        fqdn.set_fqdn(true);
        assert!(
            zone().zone_of(&fqdn),
            "{name:?} is outside the zone {ZONE}, which is all this server answers for"
        );
        let mut records = self.state.records.lock().unwrap();
        if addrs.is_empty() {
            records.remove(&LowerName::from(fqdn));
        } else {
            records.insert(LowerName::from(fqdn), (addrs.to_vec(), ttl));
        }
    }

    /// Stop answering, as a dead DNS server does: every query is read (and
    /// counted) but gets no reply, so a client times out, until `resume()`.
    pub fn pause(&self) {
        self.state.paused.store(true, Ordering::SeqCst);
    }

    pub fn resume(&self) {
        self.state.paused.store(false, Ordering::SeqCst);
    }

    /// Queries received so far over UDP and TCP, answered or not (a paused
    /// server counts the queries it ignores).
    pub fn queries(&self) -> u64 {
        self.state.queries.load(Ordering::SeqCst)
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        // Stops accepting; dropping `server` right after aborts its tasks
        // (they live in its JoinSet) and closes both sockets.
        self.server.shutdown_token().cancel();
    }
}

fn zone() -> Name {
    Name::from_ascii(ZONE).expect("the zone name is valid")
}

/// A UDP socket on 127.0.0.1:0 and a TCP listener on the same port. The
/// port is free for UDP but may be taken for TCP; then try another.
async fn bind_udp_and_tcp() -> (tokio::net::UdpSocket, tokio::net::TcpListener) {
    let mut last_error = None;
    for _ in 0..20 {
        let udp = tokio::net::UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("bind a UDP socket on 127.0.0.1");
        let addr = udp.local_addr().expect("UDP socket has an address");
        match tokio::net::TcpListener::bind(addr).await {
            Ok(tcp) => return (udp, tcp),
            Err(e) => last_error = Some(e),
        }
    }
    panic!("no port on 127.0.0.1 free for both UDP and TCP: {last_error:?}");
}

struct Handler {
    state: Arc<State>,
    zone: LowerName,
}

/// What the handler answers, decided under the lock and sent after it.
enum Answer {
    Records(Vec<Record>),
    /// The name exists but has no record of the asked type (NODATA).
    NoData,
    NxDomain,
    Refused,
}

impl Handler {
    fn answer(&self, name: &LowerName, record_type: RecordType) -> Answer {
        if !self.zone.zone_of(name) {
            return Answer::Refused;
        }
        let records = self.state.records.lock().unwrap();
        let Some((addrs, ttl)) = records.get(name) else {
            // The apex exists (it has the SOA) even with no addresses.
            return if *name == self.zone {
                Answer::NoData
            } else {
                Answer::NxDomain
            };
        };
        let owner = Name::from(name.clone());
        let found: Vec<Record> = addrs
            .iter()
            .filter(|ip| match record_type {
                RecordType::A => ip.is_ipv4(),
                RecordType::AAAA => ip.is_ipv6(),
                _ => false,
            })
            .map(|ip| Record::from_rdata(owner.clone(), *ttl, RData::from(*ip)))
            .collect();
        if found.is_empty() {
            Answer::NoData
        } else {
            Answer::Records(found)
        }
    }

    fn soa(&self) -> Record {
        let apex = Name::from(self.zone.clone());
        let soa = SOA::new(
            Name::from_ascii("ns.test.").expect("valid name"),
            Name::from_ascii("hostmaster.test.").expect("valid name"),
            1,
            3600,
            600,
            86400,
            NEGATIVE_TTL,
        );
        Record::from_rdata(apex, NEGATIVE_TTL, RData::SOA(soa))
    }

    async fn handle<R: ResponseHandler>(&self, request: &Request, mut response: R) -> ResponseInfo {
        self.state.queries.fetch_add(1, Ordering::SeqCst);
        let mut metadata = Metadata::response_from_request(&request.metadata);
        if self.state.paused.load(Ordering::SeqCst) {
            // The server ignores what a handler returns; nothing is sent.
            return ResponseInfo::from(Header {
                metadata,
                counts: HeaderCounts::default(),
            });
        }
        // Echo EDNS (RFC 6891 section 7) so the client keeps its larger
        // UDP payload size.
        let edns = request.edns.as_ref().map(|asked| {
            let mut edns = Edns::new();
            edns.set_max_payload(asked.max_payload().max(512));
            edns
        });
        let builder = MessageResponseBuilder::new(&request.queries, edns.as_ref());
        let query = match request.queries.queries() {
            [query] if request.metadata.op_code == OpCode::Query => query,
            [_] => {
                let message = builder.error_msg(&request.metadata, ResponseCode::NotImp);
                return send(&mut response, message, &metadata).await;
            }
            _ => {
                let message = builder.error_msg(&request.metadata, ResponseCode::FormErr);
                return send(&mut response, message, &metadata).await;
            }
        };
        metadata.authoritative = true;
        let soa = [self.soa()];
        let message = match self.answer(query.name(), query.query_type()) {
            Answer::Records(records) => {
                let message = builder.build(metadata, &records, [], [], []);
                return send(&mut response, message, &metadata).await;
            }
            Answer::NoData => builder.build(metadata, [], [], &soa, []),
            Answer::NxDomain => {
                metadata.response_code = ResponseCode::NXDomain;
                builder.build(metadata, [], [], &soa, [])
            }
            Answer::Refused => {
                let message = builder.error_msg(&request.metadata, ResponseCode::Refused);
                return send(&mut response, message, &metadata).await;
            }
        };
        send(&mut response, message, &metadata).await
    }
}

/// Send `message`; a failed send is the client's loss (it times out), as
/// with a real server, and is reported as SERVFAIL to hickory's logging.
async fn send<'a, R: ResponseHandler>(
    response: &mut R,
    message: hickory_server::zone_handler::MessageResponse<
        '_,
        'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
    >,
    metadata: &Metadata,
) -> ResponseInfo {
    match response.send_response(message).await {
        Ok(info) => info,
        Err(_) => {
            let mut metadata = *metadata;
            metadata.response_code = ResponseCode::ServFail;
            ResponseInfo::from(Header {
                metadata,
                counts: HeaderCounts::default(),
            })
        }
    }
}

// `RequestHandler` is an `#[async_trait]` trait; this is the signature that
// macro expands to, written out to spare the tests a dependency on
// `async-trait` itself.
impl RequestHandler for Handler {
    fn handle_request<'life0, 'life1, 'async_trait, R, T>(
        &'life0 self,
        request: &'life1 Request,
        response_handle: R,
    ) -> Pin<Box<dyn Future<Output = ResponseInfo> + Send + 'async_trait>>
    where
        R: 'async_trait + ResponseHandler,
        T: 'async_trait + Time,
        'life0: 'async_trait,
        'life1: 'async_trait,
        Self: 'async_trait,
    {
        Box::pin(self.handle(request, response_handle))
    }
}
