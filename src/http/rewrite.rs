//! What a route changes in the requests and responses it forwards, in a form the encoders
//! apply while they write a head: fields removed, set (replacing) or added, and the path's
//! prefix stripped or replaced. Values are already rendered for this request (templates are
//! the config's business); names are lower-case.

/// Field edits for one head.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldEdits {
    /// Names removed (lower-case).
    pub remove: Vec<String>,
    /// Fields that replace every field of the same name.
    pub set: Vec<(String, String)>,
    /// Fields appended, keeping any of the same name.
    pub add: Vec<(String, String)>,
}

impl FieldEdits {
    pub fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.set.is_empty() && self.add.is_empty()
    }

    /// Whether a received field of this name is left out (removed, or replaced by `set`).
    pub fn drops(&self, name: &str) -> bool {
        self.remove.iter().any(|r| r.eq_ignore_ascii_case(name))
            || self.set.iter().any(|(n, _)| n.eq_ignore_ascii_case(name))
    }

    /// Appends the set and added fields.
    pub fn encode(&self, out: &mut Vec<u8>) {
        for (name, value) in self.set.iter().chain(&self.add) {
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
    }
}

/// A change to the request path (the query is kept as it is).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathEdit {
    /// Remove this prefix when the path starts with it (`/api/x` → `/x`; `/api` → `/`).
    Strip(String),
    /// Replace this prefix with another when the path starts with it.
    Replace { from: String, to: String },
}

impl PathEdit {
    /// `target` (origin form: path and query) with the edit applied, written to `out`.
    pub fn apply(&self, target: &str, out: &mut Vec<u8>) {
        let split = target.find('?').unwrap_or(target.len());
        let (path, query) = target.split_at(split);
        let (from, to) = match self {
            PathEdit::Strip(p) => (p.as_str(), ""),
            PathEdit::Replace { from, to } => (from.as_str(), to.as_str()),
        };
        match path.strip_prefix(from) {
            Some(rest) => {
                out.extend_from_slice(to.as_bytes());
                if !rest.starts_with('/') && !to.ends_with('/') {
                    out.push(b'/');
                }
                out.extend_from_slice(rest.as_bytes());
            }
            None => out.extend_from_slice(path.as_bytes()),
        }
        out.extend_from_slice(query.as_bytes());
    }
}

/// An IP network: an address and a prefix length. IPv4-mapped IPv6 addresses match the IPv4
/// networks they map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: std::net::IpAddr,
    prefix: u8,
}

impl Cidr {
    /// `10.0.0.0/8`, `2001:db8::/32`, or a bare address (a /32 or /128).
    pub fn parse(s: &str) -> Option<Cidr> {
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: std::net::IpAddr = a.trim().parse().ok()?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            None => max,
            Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => p.parse().ok()?,
            Some(_) => return None,
        };
        (prefix <= max).then_some(Cidr { addr, prefix })
    }

    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        use std::net::IpAddr;
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// Whether any network of `nets` contains `ip`.
pub fn any_contains(nets: &[Cidr], ip: std::net::IpAddr) -> bool {
    nets.iter().any(|n| n.contains(ip))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn networks_match_their_addresses_only() {
        let ten = Cidr::parse("10.0.0.0/8").unwrap();
        assert!(ten.contains("10.200.1.2".parse().unwrap()));
        assert!(ten.contains("::ffff:10.1.1.1".parse().unwrap()), "v4-mapped");
        assert!(!ten.contains("11.0.0.1".parse().unwrap()));
        let one = Cidr::parse("192.0.2.7").unwrap();
        assert!(one.contains("192.0.2.7".parse().unwrap()));
        assert!(!one.contains("192.0.2.8".parse().unwrap()));
        let all = Cidr::parse("0.0.0.0/0").unwrap();
        assert!(all.contains("8.8.8.8".parse().unwrap()));
        let v6 = Cidr::parse("2001:db8::/32").unwrap();
        assert!(v6.contains("2001:db8:1::5".parse().unwrap()));
        assert!(!v6.contains("2001:db9::5".parse().unwrap()));
        for bad in ["10.0.0.0/33", "10.0.0.0/", "nope", "10.0.0.0/+8", "::/129"] {
            assert_eq!(Cidr::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn path_prefixes_are_stripped_or_replaced_and_the_query_kept() {
        let run = |e: &PathEdit, t: &str| {
            let mut out = Vec::new();
            e.apply(t, &mut out);
            String::from_utf8(out).unwrap()
        };
        let strip = PathEdit::Strip("/api".into());
        assert_eq!(run(&strip, "/api/users?id=1"), "/users?id=1");
        assert_eq!(run(&strip, "/api"), "/");
        assert_eq!(run(&strip, "/other/api"), "/other/api");
        let replace = PathEdit::Replace { from: "/old/".into(), to: "/new/".into() };
        assert_eq!(run(&replace, "/old/a/b?x"), "/new/a/b?x");
        assert_eq!(run(&replace, "/older"), "/older");
    }
}
