//! Networks in CIDR notation, for settings that name address ranges
//! (`--allow-private-targets-cidr`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// A network in CIDR notation (`10.0.0.0/8`, `fd00::/8`), or one address (`10.1.2.3`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Network {
    address: IpAddr,
    prefix_length: u8,
}

/// A network that could not be parsed.
#[derive(Debug, thiserror::Error)]
#[error(
    "expected a network in CIDR notation (10.0.0.0/8, fd00::/8) or an IP address, found {found:?}: {reason}"
)]
pub struct NetworkParseError {
    found: String,
    reason: &'static str,
}

impl std::str::FromStr for Network {
    type Err = NetworkParseError;

    fn from_str(text: &str) -> Result<Network, NetworkParseError> {
        let trimmed = text.trim();
        let error = |reason| NetworkParseError {
            found: trimmed.chars().take(64).collect(),
            reason,
        };
        let (address_text, prefix_text) = match trimmed.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (trimmed, None),
        };
        let address: IpAddr = address_text
            .parse()
            .map_err(|_| error("not an IP address"))?;
        let maximum = if address.is_ipv4() { 32 } else { 128 };
        let prefix_length = match prefix_text {
            None => maximum,
            Some(prefix) => prefix
                .parse::<u8>()
                .ok()
                .filter(|length| *length <= maximum)
                .ok_or_else(|| error("the prefix length is not 0–32 (IPv4) or 0–128 (IPv6)"))?,
        };
        let network = Network {
            address,
            prefix_length,
        };
        if network.masked(address) != address {
            return Err(error(
                "address bits are set beyond the prefix length (write the network's first address)",
            ));
        }
        Ok(network)
    }
}

impl std::fmt::Display for Network {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(formatter, "{}/{}", self.address, self.prefix_length)
    }
}

impl Network {
    /// `address` with the bits beyond this network's prefix cleared (same family only).
    fn masked(&self, address: IpAddr) -> IpAddr {
        match address {
            IpAddr::V4(v4) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix_length))
                    .unwrap_or(0);
                IpAddr::V4(Ipv4Addr::from(u32::from(v4) & mask))
            }
            IpAddr::V6(v6) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix_length))
                    .unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask))
            }
        }
    }

    /// Whether `address` lies in this network (an IPv4-mapped IPv6 address counts as IPv4).
    #[must_use]
    pub fn contains(&self, address: IpAddr) -> bool {
        let address = address.to_canonical();
        address.is_ipv4() == self.address.is_ipv4() && self.masked(address) == self.address
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn networks_parse_and_contain_mapped_addresses() {
        let loopback: Network = "127.0.0.0/8".parse().unwrap();
        assert!(loopback.contains("127.0.0.1".parse().unwrap()));
        assert!(loopback.contains("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!loopback.contains("128.0.0.1".parse().unwrap()));
        assert!(!loopback.contains("::1".parse().unwrap()));
        let single: Network = "::1".parse().unwrap();
        assert_eq!(single.to_string(), "::1/128");
        assert!(single.contains("::1".parse().unwrap()));
        let everything: Network = "0.0.0.0/0".parse().unwrap();
        assert!(everything.contains("10.1.2.3".parse().unwrap()));
        for bad in [
            "10.0.0.1/8",
            "10.0.0.0/33",
            "example.com/8",
            "",
            "fd00::/129",
        ] {
            let error = bad.parse::<Network>().unwrap_err().to_string();
            assert!(error.contains("CIDR"), "{bad}: {error}");
        }
    }
}
