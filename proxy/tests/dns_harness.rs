//! The test DNS server (`common::dns`) answers a real resolver: records,
//! TTLs, changes between queries, and silence while paused. The resolvers
//! here are built the way the proxy's own resolver is meant to be.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use common::dns::DnsServer;
use hickory_resolver::config::{LookupIpStrategy, NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::NetError;
use hickory_resolver::{Resolver, TokioResolver};

/// A resolver configured as the system is (/etc/resolv.conf), with its
/// cache bounded in size and in how long it keeps an answer.
fn system_resolver() -> Result<TokioResolver, NetError> {
    let mut builder = TokioResolver::builder_tokio()?;
    let opts = builder.options_mut();
    opts.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
    opts.cache_size = 1024;
    opts.positive_max_ttl = Some(Duration::from_secs(300));
    builder.build()
}

/// A resolver that asks exactly `server`, over UDP only, and caches
/// nothing (a cache of size 0 is no cache in moka, which hickory uses):
/// every lookup is a query. No search domains, no hosts file.
fn resolver_for(server: SocketAddr, timeout: Duration) -> Result<TokioResolver, NetError> {
    let mut name_server = NameServerConfig::udp(server.ip());
    for connection in &mut name_server.connections {
        connection.port = server.port();
    }
    let config = ResolverConfig::from_name_servers(vec![name_server]);
    let mut opts = ResolverOpts::default();
    opts.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
    opts.cache_size = 0;
    opts.timeout = timeout;
    opts.attempts = 1;
    opts.use_hosts_file = hickory_resolver::config::ResolveHosts::Never;
    Resolver::builder_with_config(config, TokioRuntimeProvider::default())
        .with_options(opts)
        .build()
}

/// A and AAAA of `host` (give it a final dot: no search list is tried),
/// sorted, and the least TTL among them.
async fn resolve(
    resolver: &TokioResolver,
    host: &str,
) -> Result<(Vec<IpAddr>, u32, Instant), NetError> {
    let lookup = resolver.lookup_ip(host).await?;
    let mut addrs: Vec<IpAddr> = lookup.iter().collect();
    addrs.sort();
    let ttl = lookup
        .as_lookup()
        .answers()
        .iter()
        .filter(|record| record.data.ip_addr().is_some())
        .map(|record| record.ttl)
        .min()
        .unwrap_or(0);
    Ok((addrs, ttl, lookup.valid_until()))
}

fn ips(list: &[&str]) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = list.iter().map(|s| s.parse().unwrap()).collect();
    out.sort();
    out
}

#[tokio::test]
async fn a_resolver_sees_the_records_and_their_ttl() {
    let dns = DnsServer::start().await;
    let want = ips(&["127.0.0.11", "127.0.0.12", "::1"]);
    dns.set("ping-stable.test.", &want, 5);
    let resolver = resolver_for(dns.addr, Duration::from_secs(2)).unwrap();

    let before = Instant::now();
    let (addrs, ttl, valid_until) = resolve(&resolver, "ping-stable.test.").await.unwrap();
    assert_eq!(addrs, want);
    assert!((1..=5).contains(&ttl), "TTL {ttl} is not the 5 s served");
    assert!(valid_until <= before + Duration::from_secs(6));
    assert_eq!(dns.queries(), 2, "one A and one AAAA query");

    // A name the zone lacks is NXDOMAIN: an error to the resolver.
    assert!(resolve(&resolver, "ping-gone.test.").await.is_err());

    // The system-configured builder needs a resolv.conf to read; it sends
    // nothing until asked.
    if std::path::Path::new("/etc/resolv.conf").exists() {
        system_resolver().expect("builds from /etc/resolv.conf");
    }
}

#[tokio::test]
async fn changes_are_seen_and_a_paused_server_times_out() {
    let dns = DnsServer::start().await;
    dns.set("ping-canary.test.", &ips(&["127.0.0.21"]), 5);
    let resolver = resolver_for(dns.addr, Duration::from_secs(1)).unwrap();
    let (addrs, _, _) = resolve(&resolver, "ping-canary.test.").await.unwrap();
    assert_eq!(addrs, ips(&["127.0.0.21"]));

    // Replaced, then asked again through the same resolver: no cache.
    let new = ips(&["127.0.0.22", "127.0.0.23"]);
    dns.set("ping-canary.test.", &new, 1);
    let (addrs, ttl, _) = resolve(&resolver, "ping-canary.test.").await.unwrap();
    assert_eq!(addrs, new);
    assert!(ttl <= 1);
    assert_eq!(dns.queries(), 4, "cache_size 0: each lookup asks again");

    dns.pause();
    let asked = dns.queries();
    let started = Instant::now();
    let paused = tokio::time::timeout(
        Duration::from_secs(5),
        resolve(&resolver, "ping-canary.test."),
    )
    .await
    .expect("the resolver's own 1 s timeout ends the lookup");
    assert!(paused.is_err(), "a paused server answered: {paused:?}");
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert!(dns.queries() > asked, "the queries reached the server");

    dns.resume();
    let (addrs, _, _) = resolve(&resolver, "ping-canary.test.").await.unwrap();
    assert_eq!(addrs, new);

    // An empty list removes the name.
    dns.set("ping-canary.test.", &[], 5);
    assert!(resolve(&resolver, "ping-canary.test.").await.is_err());
}
