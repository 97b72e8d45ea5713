//! The SSRF guard: a webhook URL whose host comes from event data may not reach a loopback,
//! private, link-local or otherwise non-public address.
//!
//! Whoever can write a tracked table controls the event data; a URL template that lets that data
//! choose the host would otherwise let them make the node call its own metadata service
//! (169.254.169.254), its Redis or any internal service. Literal URLs (and `url_env`) are the
//! operator's intent and are never checked, nor are URL templates whose literal text fixes the
//! scheme, host and port before the first tag.
//!
//! The check is made on the address actually connected to: guarded requests go through their
//! own HTTP client whose DNS resolver ([`GuardedResolver`]) resolves the host and hands the
//! connector only the addresses that pass, so a name that resolves to a public address when
//! checked and to a private one when connecting (DNS rebinding) cannot slip through — there is
//! one resolution, and it is the one used. Hosts written as IP addresses are not resolved by the
//! client at all, so [`TargetPolicy::check_url`] checks them before the request. The guarded
//! client ignores `HTTP(S)_PROXY`: through a proxy, the proxy would resolve the host, out of
//! our sight.
//!
//! An action with `allow_private_targets: true` is not guarded; a node started with
//! `--allow-private-targets-cidr` lets the listed networks through ([`TargetPolicy::allowing`]).
//! A refusal is [`ErrorCode::TargetRefused`] (OB017), permanent, naming the address and the
//! range it falls in, never the URL.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use crate::config::Network;
use crate::error::ErrorCode;
use crate::retry::AttemptError;

/// Which non-public range `address` lies in (`"loopback"`, `"private (RFC 1918)"`, …), or
/// `None` for a public unicast address. IPv4 addresses embedded in IPv6 (IPv4-mapped
/// `::ffff:a.b.c.d`, IPv4-compatible `::a.b.c.d`, NAT64 `64:ff9b::/96`, 6to4 `2002::/16`) are
/// judged by their IPv4 address.
#[must_use]
pub fn non_public_range(address: IpAddr) -> Option<&'static str> {
    match address {
        IpAddr::V4(v4) => non_public_v4(v4),
        IpAddr::V6(v6) => non_public_v6(v6),
    }
}

fn non_public_v4(address: Ipv4Addr) -> Option<&'static str> {
    let [first, second, third, _] = address.octets();
    let range = match (first, second, third) {
        (0, _, _) => "unspecified (0.0.0.0/8)",
        (10, _, _) | (172, 16..=31, _) | (192, 168, _) => "private (RFC 1918)",
        (100, 64..=127, _) => "shared address space (carrier-grade NAT, 100.64.0.0/10)",
        (127, _, _) => "loopback",
        (169, 254, _) => "link-local (cloud metadata services)",
        (192, 0, 0) => "IETF protocol assignments (192.0.0.0/24)",
        (192, 0, 2) | (198, 51, 100) | (203, 0, 113) => "documentation",
        (198, 18..=19, _) => "benchmarking (198.18.0.0/15)",
        (224..=239, _, _) => "multicast",
        (240..=255, _, _) => "reserved or broadcast (240.0.0.0/4)",
        _ => return None,
    };
    Some(range)
}

fn non_public_v6(address: Ipv6Addr) -> Option<&'static str> {
    if address.is_unspecified() {
        return Some("unspecified (::)");
    }
    if address.is_loopback() {
        return Some("loopback (::1)");
    }
    let segments = address.segments();
    let bits = u128::from(address);
    let embedded_v4 = Ipv4Addr::from(u32::try_from(bits & 0xffff_ffff).unwrap_or_default());
    match segments {
        // IPv4-mapped (::ffff:a.b.c.d) and NAT64 (64:ff9b::/96, where the gateway connects to
        // the embedded address): judged as the IPv4 address they reach.
        [0, 0, 0, 0, 0, 0xffff, _, _] | [0x64, 0xff9b, 0, 0, 0, 0, _, _] => {
            return non_public_v4(embedded_v4);
        }
        // IPv4-compatible (::a.b.c.d, deprecated): never a public route.
        [0, 0, 0, 0, 0, 0, _, _] => {
            return Some(
                non_public_v4(embedded_v4).unwrap_or("IPv4-compatible (::/96, deprecated)"),
            );
        }
        [0x64, 0xff9b, 1, ..] => return Some("NAT64 local use (64:ff9b:1::/48)"),
        // 6to4 (2002::/16): the IPv4 address is in bits 16–48.
        [0x2002, high, low, ..] => {
            let tunnelled = Ipv4Addr::from((u32::from(high) << 16) | u32::from(low));
            return non_public_v4(tunnelled).map(|_| "6to4 around a non-public IPv4 address");
        }
        _ => {}
    }
    let range = match segments[0] {
        0x0100 if segments[1..4] == [0, 0, 0] => "discard-only (100::/64)",
        0x2001 if segments[1] == 0 => "Teredo tunnel (2001::/32)",
        0x2001 if segments[1] == 0x0db8 => "documentation (2001:db8::/32)",
        first if first & 0xfe00 == 0xfc00 => "unique local (private, fc00::/7)",
        first if first & 0xffc0 == 0xfe80 => "link-local (fe80::/10)",
        first if first & 0xffc0 == 0xfec0 => "site-local (fec0::/10, deprecated)",
        first if first & 0xff00 == 0xff00 => "multicast",
        _ => return None,
    };
    Some(range)
}

/// A target address the guard refused: names the address and its range, never the URL.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "{address} ({range}) is not a public address, and this webhook's host comes from event \
     data; not called (set allow_private_targets: true on the action, or start the node with \
     --allow-private-targets-cidr, to allow it)"
)]
pub struct TargetRefused {
    pub address: IpAddr,
    pub range: &'static str,
}

impl TargetRefused {
    /// The permanent OB017 failure this refusal is reported as.
    #[must_use]
    pub fn into_attempt_error(self) -> AttemptError {
        AttemptError::new(ErrorCode::TargetRefused, self.to_string())
    }
}

/// The [`TargetRefused`] somewhere in `error`'s source chain, if the guard caused it.
#[must_use]
pub fn refusal_in<'error>(
    error: &'error (dyn std::error::Error + 'static),
) -> Option<&'error TargetRefused> {
    let mut current = Some(error);
    while let Some(cause) = current {
        if let Some(refused) = cause.downcast_ref::<TargetRefused>() {
            return Some(refused);
        }
        current = cause.source();
    }
    None
}

/// Which addresses guarded requests may reach: every public address, plus the node's allowed
/// networks.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TargetPolicy {
    allowed: Arc<[Network]>,
}

impl TargetPolicy {
    /// A policy that also lets `allowed` through (`--allow-private-targets-cidr`).
    #[must_use]
    pub fn allowing(allowed: &[Network]) -> TargetPolicy {
        TargetPolicy {
            allowed: allowed.into(),
        }
    }

    /// # Errors
    /// The refusal when `address` is non-public and in no allowed network.
    pub fn check(&self, address: IpAddr) -> Result<(), TargetRefused> {
        let Some(range) = non_public_range(address) else {
            return Ok(());
        };
        if self
            .allowed
            .iter()
            .any(|network| network.contains(address) || network.contains(address.to_canonical()))
        {
            return Ok(());
        }
        Err(TargetRefused { address, range })
    }

    /// Checks a host written as an IP address (the client does not resolve those, so the
    /// resolver never sees them); a host name is left to [`GuardedResolver`].
    ///
    /// # Errors
    /// The refusal of a non-public literal address.
    pub fn check_url(&self, url: &url::Url) -> Result<(), TargetRefused> {
        match url.host() {
            Some(url::Host::Ipv4(address)) => self.check(IpAddr::V4(address)),
            Some(url::Host::Ipv6(address)) => self.check(IpAddr::V6(address)),
            Some(url::Host::Domain(_)) | None => Ok(()),
        }
    }

    /// The addresses of `resolved` this policy lets through, or the first refusal when none is.
    ///
    /// # Errors
    /// Every address was refused (or there was none).
    pub fn filter(&self, resolved: Vec<SocketAddr>) -> Result<Vec<SocketAddr>, ResolveRefused> {
        let mut first_refusal = None;
        let allowed: Vec<SocketAddr> = resolved
            .into_iter()
            .filter(|address| match self.check(address.ip()) {
                Ok(()) => true,
                Err(refused) => {
                    first_refusal.get_or_insert(refused);
                    false
                }
            })
            .collect();
        if !allowed.is_empty() {
            return Ok(allowed);
        }
        Err(first_refusal.map_or(ResolveRefused::NoAddress, ResolveRefused::Refused))
    }
}

/// Why a guarded resolution gave the connector nothing.
#[derive(Debug, thiserror::Error)]
pub enum ResolveRefused {
    #[error(transparent)]
    Refused(TargetRefused),
    #[error("the host name resolved to no address")]
    NoAddress,
}

/// The DNS resolver of the guarded HTTP client: the system resolver, then
/// [`TargetPolicy::filter`]. What it returns is what the connector connects to.
#[derive(Debug)]
pub struct GuardedResolver {
    pub policy: TargetPolicy,
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.policy.clone();
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let resolved: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            match policy.filter(resolved) {
                Ok(allowed) => Ok(Box::new(allowed.into_iter()) as reqwest::dns::Addrs),
                // The refusal itself, so that `refusal_in` finds it in the client's error chain.
                Err(ResolveRefused::Refused(refused)) => Err(Box::new(refused) as _),
                Err(error @ ResolveRefused::NoAddress) => Err(Box::new(error) as _),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range_of(text: &str) -> Option<&'static str> {
        non_public_range(text.parse().unwrap())
    }

    #[test]
    fn special_ranges_are_named_and_public_addresses_pass() {
        for (address, expected) in [
            ("127.0.0.1", "loopback"),
            ("127.255.0.9", "loopback"),
            ("10.0.0.1", "private (RFC 1918)"),
            ("172.16.0.1", "private (RFC 1918)"),
            ("172.31.255.255", "private (RFC 1918)"),
            ("192.168.1.1", "private (RFC 1918)"),
            ("169.254.169.254", "link-local (cloud metadata services)"),
            ("0.0.0.0", "unspecified (0.0.0.0/8)"),
            (
                "100.64.0.1",
                "shared address space (carrier-grade NAT, 100.64.0.0/10)",
            ),
            ("192.0.0.192", "IETF protocol assignments (192.0.0.0/24)"),
            ("198.18.0.1", "benchmarking (198.18.0.0/15)"),
            ("224.0.0.1", "multicast"),
            ("255.255.255.255", "reserved or broadcast (240.0.0.0/4)"),
            ("::", "unspecified (::)"),
            ("::1", "loopback (::1)"),
            ("::ffff:127.0.0.1", "loopback"),
            (
                "::ffff:169.254.169.254",
                "link-local (cloud metadata services)",
            ),
            ("::127.0.0.1", "loopback"),
            ("::8.8.8.8", "IPv4-compatible (::/96, deprecated)"),
            ("64:ff9b::10.0.0.1", "private (RFC 1918)"),
            ("64:ff9b:1::1", "NAT64 local use (64:ff9b:1::/48)"),
            ("2002:7f00:1::1", "6to4 around a non-public IPv4 address"),
            ("fc00::1", "unique local (private, fc00::/7)"),
            ("fd00:ec2::254", "unique local (private, fc00::/7)"),
            ("fe80::1", "link-local (fe80::/10)"),
            ("febf::1", "link-local (fe80::/10)"),
            ("fec0::1", "site-local (fec0::/10, deprecated)"),
            ("ff02::1", "multicast"),
            ("100::1", "discard-only (100::/64)"),
            ("2001:db8::1", "documentation (2001:db8::/32)"),
            ("2001:0:4136:e378::1", "Teredo tunnel (2001::/32)"),
        ] {
            assert_eq!(range_of(address), Some(expected), "{address}");
        }
        for public in [
            "8.8.8.8",
            "1.1.1.1",
            "172.32.0.1",
            "100.128.0.1",
            "169.255.0.1",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
            "2002:808:808::1",
            "2606:4700:4700::1111",
            "2001:4860:4860::8888",
        ] {
            assert_eq!(range_of(public), None, "{public}");
        }
    }

    #[test]
    fn the_policy_refuses_non_public_addresses_outside_its_allowed_networks() {
        let strict = TargetPolicy::default();
        let refused = strict
            .check("169.254.169.254".parse().unwrap())
            .unwrap_err();
        assert!(
            refused
                .to_string()
                .starts_with("169.254.169.254 (link-local"),
            "{refused}"
        );
        assert!(strict.check("8.8.8.8".parse().unwrap()).is_ok());
        let allowing = TargetPolicy::allowing(&["10.0.0.0/8".parse().unwrap()]);
        assert!(allowing.check("10.1.2.3".parse().unwrap()).is_ok());
        assert!(allowing.check("::ffff:10.1.2.3".parse().unwrap()).is_ok());
        assert!(allowing.check("127.0.0.1".parse().unwrap()).is_err());

        let mixed = vec!["127.0.0.1:0".parse().unwrap(), "8.8.8.8:0".parse().unwrap()];
        assert_eq!(
            strict.filter(mixed).unwrap(),
            vec!["8.8.8.8:0".parse::<SocketAddr>().unwrap()]
        );
        let ResolveRefused::Refused(refusal) =
            strict.filter(vec!["[::1]:0".parse().unwrap()]).unwrap_err()
        else {
            panic!("expected a refusal");
        };
        assert_eq!(refusal.address, "::1".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn literal_hosts_are_checked_before_any_resolution() {
        let strict = TargetPolicy::default();
        for url in [
            "http://127.0.0.1/x",
            "http://[::1]:8080/",
            "http://[::ffff:7f00:1]/",
            "http://0x7f.1/",
            "http://2130706433/",
            "http://0/",
        ] {
            let parsed = url::Url::parse(url).unwrap();
            assert!(strict.check_url(&parsed).is_err(), "{url}");
        }
        assert!(
            strict
                .check_url(&url::Url::parse("http://localhost/").unwrap())
                .is_ok(),
            "host names are the resolver's"
        );
    }

    #[tokio::test]
    async fn the_resolver_refuses_a_name_that_resolves_to_loopback() {
        use reqwest::dns::Resolve as _;
        let resolver = GuardedResolver {
            policy: TargetPolicy::default(),
        };
        let error = resolver
            .resolve("localhost".parse().unwrap())
            .await
            .err()
            .expect("localhost is refused");
        let refused = refusal_in(error.as_ref()).expect("a TargetRefused");
        assert!(refused.address.is_loopback(), "{refused}");

        let allowing = GuardedResolver {
            policy: TargetPolicy::allowing(&[
                "127.0.0.0/8".parse().unwrap(),
                "::1/128".parse().unwrap(),
            ]),
        };
        let addresses: Vec<SocketAddr> = allowing
            .resolve("localhost".parse().unwrap())
            .await
            .unwrap()
            .collect();
        assert!(!addresses.is_empty());
        assert!(addresses.iter().all(|address| address.ip().is_loopback()));
    }
}
