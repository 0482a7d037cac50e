//! The resolver DNS discovery uses (`endpoints::Resolve`), on hickory: the
//! system's configuration (`/etc/resolv.conf`, which in a pod points at the
//! cluster DNS and carries its search domains), or one given name server
//! (tests). Built on first use, so a proxy without discovery never reads
//! the system configuration.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use hickory_resolver::config::{
    ConnectionConfig, LookupIpStrategy, NameServerConfig, ResolverConfig,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::{Resolver, TokioResolver};

use crate::endpoints::{Lookup, Resolve};

#[derive(Debug)]
pub(crate) struct Dns {
    /// `None`: the system's configuration.
    server: Option<SocketAddr>,
    resolver: OnceLock<Result<TokioResolver, String>>,
}

impl Dns {
    pub(crate) fn new(server: Option<SocketAddr>) -> Arc<Dns> {
        Arc::new(Dns {
            server,
            resolver: OnceLock::new(),
        })
    }

    fn resolver(&self) -> Result<&TokioResolver, String> {
        self.resolver
            .get_or_init(|| {
                let provider = TokioRuntimeProvider::default();
                let mut builder = match self.server {
                    Some(addr) => {
                        let mut udp = ConnectionConfig::udp();
                        udp.port = addr.port();
                        let mut tcp = ConnectionConfig::tcp();
                        tcp.port = addr.port();
                        let mut server = NameServerConfig::udp_and_tcp(addr.ip());
                        server.connections = vec![udp, tcp];
                        Resolver::builder_with_config(
                            ResolverConfig::from_name_servers(vec![server]),
                            provider,
                        )
                    }
                    None => Resolver::builder(provider).map_err(|e| {
                        format!(
                            "cannot read the system's DNS configuration (/etc/resolv.conf): {e}"
                        )
                    })?,
                };
                let opts = builder.options_mut();
                // Every address: a pod may have only an IPv6 one.
                opts.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
                // The refresh honours the TTL itself; a cached answer
                // would only hide a change for longer.
                opts.cache_size = 0;
                opts.timeout = Duration::from_secs(2);
                opts.attempts = 2;
                builder
                    .build()
                    .map_err(|e| format!("cannot set up the DNS resolver: {e}"))
            })
            .as_ref()
            .map_err(Clone::clone)
    }
}

impl Resolve for Dns {
    fn lookup(&self, host: String) -> Lookup {
        let resolver = self.resolver().cloned();
        Box::pin(async move {
            let resolver = resolver?;
            let lookup = resolver
                .lookup_ip(host.as_str())
                .await
                .map_err(|e| format!("lookup of {host} failed: {e}"))?;
            let ttl = lookup.valid_until().checked_duration_since(Instant::now());
            Ok((lookup.iter().collect(), ttl))
        })
    }
}
