//! Source addresses: IP networks (for `SPARKY_TRUSTED_PROXIES` and `SPARKY_IP_ALLOWLIST`) and the
//! client address of a request.
//!
//! The client address is the TCP peer, unless the peer is a configured trusted proxy: then
//! `X-Forwarded-For` is read from the right (the entry the trusted proxy appended), skipping further
//! trusted proxies, and the first address that is not a trusted proxy is the client. Everything left
//! of that address was written by the client itself and is ignored, so a caller cannot pick its own
//! address by sending the header. Without trusted proxies the header is never read.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use axum::http::HeaderMap;

/// TradingView's documented webhook source addresses
/// (<https://www.tradingview.com/support/solutions/43000529348>).
pub const TRADINGVIEW_ADDRESSES: [&str; 4] = [
    "52.89.214.238",
    "34.212.75.30",
    "54.218.53.128",
    "52.32.178.7",
];

/// An IP network: `10.0.0.0/8`, `2001:db8::/32`, or a single address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpNet {
    addr: IpAddr,
    prefix: u8,
}

impl IpNet {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, canonical(ip)) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// IPv4-mapped IPv6 addresses (`::ffff:1.2.3.4`, what a dual-stack socket reports) as IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

impl FromStr for IpNet {
    type Err = String;
    fn from_str(s: &str) -> Result<IpNet, String> {
        let s = s.trim();
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("`{s}` is not an IP address or network (a.b.c.d[/n])"))?;
        let addr = canonical(addr);
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => match p.parse::<u8>() {
                Ok(n) if n <= max => n,
                _ => return Err(format!("`{s}`: prefix length must be 0..={max}")),
            },
        };
        Ok(IpNet { addr, prefix })
    }
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// What failed authentications are counted by: an IPv4 address, or the /64 an IPv6 address is in.
/// One IPv6 subscriber usually gets a whole /64 (often more), so counting single IPv6 addresses
/// would let anyone rotate through 2^64 addresses to dodge the count.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Source(IpAddr);

impl Source {
    pub fn of(ip: IpAddr) -> Source {
        match canonical(ip) {
            IpAddr::V6(v6) => {
                let prefix = u128::from(v6) & (u128::MAX << 64);
                Source(IpAddr::V6(prefix.into()))
            }
            v4 => Source(v4),
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            IpAddr::V4(v4) => write!(f, "{v4}"),
            IpAddr::V6(v6) => write!(f, "{v6}/64"),
        }
    }
}

/// A comma-separated list of networks; the word `tradingview` stands for [`TRADINGVIEW_ADDRESSES`].
pub fn parse_list(s: &str) -> Result<Vec<IpNet>, String> {
    let mut out = Vec::new();
    for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        if item.eq_ignore_ascii_case("tradingview") {
            out.extend(
                TRADINGVIEW_ADDRESSES
                    .iter()
                    .map(|a| a.parse::<IpNet>().unwrap()),
            );
        } else {
            out.push(item.parse()?);
        }
    }
    Ok(out)
}

fn in_any(nets: &[IpNet], ip: IpAddr) -> bool {
    nets.iter().any(|n| n.contains(ip))
}

/// The client's address (see the module note).
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted_proxies: &[IpNet]) -> IpAddr {
    let peer = canonical(peer);
    if !in_any(trusted_proxies, peer) {
        return peer;
    }
    // Several X-Forwarded-For headers form one list, in order.
    let hops: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    let mut client = peer;
    for hop in hops.iter().rev() {
        match hop.parse::<IpAddr>() {
            Ok(ip) => {
                client = canonical(ip);
                if !in_any(trusted_proxies, client) {
                    return client;
                }
            }
            // A hop we cannot read: the last trusted address is the best we know.
            Err(_) => return client,
        }
    }
    client
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn networks_parse_and_match() {
        let n: IpNet = "10.1.0.0/16".parse().unwrap();
        assert!(n.contains(ip("10.1.200.3")));
        assert!(!n.contains(ip("10.2.0.1")));
        assert!(n.contains(ip("::ffff:10.1.0.9")));
        let one: IpNet = "52.89.214.238".parse().unwrap();
        assert!(one.contains(ip("52.89.214.238")) && !one.contains(ip("52.89.214.239")));
        let all: IpNet = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(ip("8.8.8.8")) && !all.contains(ip("2001:db8::1")));
        let v6: IpNet = "2001:db8::/32".parse().unwrap();
        assert!(v6.contains(ip("2001:db8:1::1")) && !v6.contains(ip("2001:db9::1")));
        assert!("10.0.0.0/33".parse::<IpNet>().is_err());
        assert!("bob".parse::<IpNet>().is_err());
        assert_eq!(parse_list("tradingview, 10.0.0.1").unwrap().len(), 5);
        assert_eq!(parse_list("").unwrap(), vec![]);
    }

    #[test]
    fn sources_are_ipv4_addresses_and_ipv6_slash_64s() {
        let a = Source::of(ip("2001:db8:1:2::a"));
        assert_eq!(a, Source::of(ip("2001:db8:1:2:ffff:ffff:ffff:ffff")));
        assert_ne!(a, Source::of(ip("2001:db8:1:3::a")));
        assert_eq!(a.to_string(), "2001:db8:1:2::/64");
        assert_eq!(Source::of(ip("::ffff:10.1.2.3")).to_string(), "10.1.2.3");
        assert_ne!(Source::of(ip("10.1.2.3")), Source::of(ip("10.1.2.4")));
    }

    #[test]
    fn forwarded_for_is_read_only_from_trusted_proxies() {
        let mut h = HeaderMap::new();
        h.insert(
            "x-forwarded-for",
            HeaderValue::from_static("1.1.1.1, 52.89.214.238, 10.0.0.2"),
        );
        let proxies = parse_list("10.0.0.0/24").unwrap();
        // not from a trusted proxy: the header is ignored
        assert_eq!(client_ip(ip("9.9.9.9"), &h, &proxies), ip("9.9.9.9"));
        assert_eq!(client_ip(ip("10.0.0.1"), &h, &[]), ip("10.0.0.1"));
        // from a trusted proxy: the rightmost untrusted hop, never the client-written left part
        assert_eq!(client_ip(ip("10.0.0.1"), &h, &proxies), ip("52.89.214.238"));
        // no header: the proxy itself
        assert_eq!(
            client_ip(ip("10.0.0.1"), &HeaderMap::new(), &proxies),
            ip("10.0.0.1")
        );
        // garbage hop: stop at the last trusted address
        let mut g = HeaderMap::new();
        g.insert(
            "x-forwarded-for",
            HeaderValue::from_static("52.89.214.238, junk"),
        );
        assert_eq!(client_ip(ip("10.0.0.1"), &g, &proxies), ip("10.0.0.1"));
    }
}
