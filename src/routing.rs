//! Choosing a route for a request: most specific host first, then most specific path.
//!
//! Precedence, among the routes that match a request: host exact > longest `*.suffix` > any;
//! then path exact > longest prefix; then a route naming the method > one that does not. The
//! table is built once per config and never changes; workers read it without locks.

use std::collections::HashMap;

use crate::config::{HostMatch, PathMatch, Route};

/// Prefix routes grouped by prefix length: a lookup tries one hash probe per distinct length
/// (longest first), so its cost grows with how many lengths there are, not how many routes.
#[derive(Debug, Default)]
struct PathTable {
    exact: HashMap<String, Vec<Entry>>,
    /// `(length, prefixes of that length)`, longest first.
    prefixes: Vec<(usize, HashMap<String, Vec<Entry>>)>,
}

#[derive(Debug, Clone)]
struct Entry {
    method: Option<String>,
    route: usize,
}

fn pick(entries: &[Entry], method: &str) -> Option<usize> {
    entries
        .iter()
        .find(|e| e.method.as_deref() == Some(method))
        .or_else(|| entries.iter().find(|e| e.method.is_none()))
        .map(|e| e.route)
}

impl PathTable {
    fn insert(&mut self, path: &PathMatch, entry: Entry) {
        match path {
            PathMatch::Exact(p) => self.exact.entry(p.clone()).or_default().push(entry),
            PathMatch::Prefix(p) => {
                let i = match self.prefixes.iter().position(|(len, _)| *len == p.len()) {
                    Some(i) => i,
                    None => {
                        self.prefixes.push((p.len(), HashMap::new()));
                        self.prefixes.len() - 1
                    }
                };
                self.prefixes[i].1.entry(p.clone()).or_default().push(entry);
            }
        }
    }

    fn finish(&mut self) {
        self.prefixes.sort_by_key(|(len, _)| std::cmp::Reverse(*len));
    }

    fn lookup(&self, path: &str, method: &str) -> Option<usize> {
        if let Some(r) = self.exact.get(path).and_then(|e| pick(e, method)) {
            return Some(r);
        }
        self.prefixes.iter().filter(|(len, _)| *len <= path.len()).find_map(|(len, table)| {
            // Route prefixes are whole strings, so a cut inside a character matches none.
            let head = path.get(..*len)?;
            table.get(head).and_then(|e| pick(e, method))
        })
    }
}

/// The immutable routing table; `route` returns an index into the config's `routes`.
#[derive(Debug, Default)]
pub struct Router {
    exact_hosts: HashMap<String, PathTable>,
    /// Wildcard hosts by suffix length (`.example.com` is 12), longest first: one hash probe
    /// per distinct length.
    suffixes: Vec<(usize, HashMap<String, PathTable>)>,
    any_host: PathTable,
}

/// Host names longer than this only match `any` routes (DNS names are at most 253 bytes).
const MAX_HOST: usize = 255;

impl Router {
    pub fn new(routes: &[Route]) -> Router {
        let mut r = Router::default();
        for (i, route) in routes.iter().enumerate() {
            let entry = Entry { method: route.method.clone(), route: i };
            let table = match &route.host {
                HostMatch::Exact(h) => r.exact_hosts.entry(h.clone()).or_default(),
                HostMatch::Suffix(s) => {
                    let i = match r.suffixes.iter().position(|(len, _)| *len == s.len()) {
                        Some(i) => i,
                        None => {
                            r.suffixes.push((s.len(), HashMap::new()));
                            r.suffixes.len() - 1
                        }
                    };
                    r.suffixes[i].1.entry(s.clone()).or_default()
                }
                HostMatch::Any => &mut r.any_host,
            };
            table.insert(&route.path, entry);
        }
        r.suffixes.sort_by_key(|(len, _)| std::cmp::Reverse(*len));
        r.exact_hosts.values_mut().for_each(PathTable::finish);
        r.suffixes.iter_mut().flat_map(|(_, t)| t.values_mut()).for_each(PathTable::finish);
        r.any_host.finish();
        r
    }

    /// `host` without port, any case; `path` without query; `method` as sent (case-sensitive).
    pub fn route(&self, host: &str, path: &str, method: &str) -> Option<usize> {
        let mut lower = [0u8; MAX_HOST];
        let host = if host.len() <= MAX_HOST {
            let l = &mut lower[..host.len()];
            l.copy_from_slice(host.as_bytes());
            l.make_ascii_lowercase();
            std::str::from_utf8(l).unwrap_or("")
        } else {
            ""
        };
        if !host.is_empty() {
            if let Some(r) = self.exact_hosts.get(host).and_then(|t| t.lookup(path, method)) {
                return Some(r);
            }
            for (len, tables) in &self.suffixes {
                // `*.x` needs at least one more character than `.x`.
                let tail = if host.len() > *len { host.get(host.len() - len..) } else { None };
                if let Some(r) =
                    tail.and_then(|t| tables.get(t)).and_then(|t| t.lookup(path, method))
                {
                    return Some(r);
                }
            }
        }
        self.any_host.lookup(path, method)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn router() -> (Router, Config) {
        let c = Config::from_yaml(
            r#"
listeners: [ { name: a, address: "127.0.0.1:1" } ]
routes:
  - { match: { path_prefix: "/" }, respond: { status: 200, body: "0 any" } }
  - { match: { path_prefix: "/v1" }, respond: { status: 200, body: "1 any /v1" } }
  - { match: { path: "/v1/exact" }, respond: { status: 200, body: "2 any exact" } }
  - { match: { host: "*.example.com", path_prefix: "/" }, respond: { status: 200, body: "3 suffix" } }
  - { match: { host: "*.api.example.com", path_prefix: "/" }, respond: { status: 200, body: "4 longer suffix" } }
  - { match: { host: "api.example.com", path_prefix: "/v1" }, respond: { status: 200, body: "5 exact host" } }
  - { match: { host: "api.example.com", path_prefix: "/v1", method: POST }, respond: { status: 200, body: "6 post" } }
"#,
            "t.yaml",
        )
        .unwrap();
        (Router::new(&c.routes), c)
    }

    #[test]
    fn most_specific_route_wins() {
        let (r, _) = router();
        assert_eq!(r.route("other", "/x", "GET"), Some(0));
        assert_eq!(r.route("other", "/v1/x", "GET"), Some(1));
        assert_eq!(r.route("other", "/v1/exact", "GET"), Some(2));
        assert_eq!(r.route("www.example.com", "/v1/exact", "GET"), Some(3));
        assert_eq!(r.route("a.api.example.com", "/", "GET"), Some(4));
        assert_eq!(r.route("API.Example.com", "/v1/users", "GET"), Some(5));
        assert_eq!(r.route("api.example.com", "/v1/users", "POST"), Some(6));
        // The exact host has no route for /other: the next most specific host group answers.
        assert_eq!(r.route("api.example.com", "/other", "GET"), Some(3));
        assert_eq!(r.route("example.com", "/", "GET"), Some(0), "*.x does not match x itself");
    }

    #[test]
    fn no_match_is_none() {
        let c = Config::from_yaml(
            "listeners: [ { name: a, address: \"127.0.0.1:1\" } ]\nroutes:\n  - { match: { path: \"/only\", method: GET }, respond: { status: 200 } }\n",
            "t.yaml",
        )
        .unwrap();
        let r = Router::new(&c.routes);
        assert_eq!(r.route("h", "/only", "GET"), Some(0));
        assert_eq!(r.route("h", "/only", "POST"), None);
        assert_eq!(r.route("h", "/other", "GET"), None);
    }
}
