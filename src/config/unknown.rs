//! Unknown keys: where they are, and the known key an operator most likely meant.

use serde::de::{self, Deserialize, Deserializer, Visitor};

use super::error::{ConfigError, Problem};
use super::raw;

/// A serde_ignored path in the config's key-path form: `clusters[0].health_check.intervl`.
pub fn key_path(p: &serde_ignored::Path<'_>) -> String {
    use serde_ignored::Path;
    match p {
        Path::Root => String::new(),
        Path::Seq { parent, index } => format!("{}[{index}]", key_path(parent)),
        Path::Map { parent, key } => {
            let base = key_path(parent);
            if base.is_empty() {
                key.clone()
            } else {
                format!("{base}.{key}")
            }
        }
        Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => key_path(parent),
    }
}

/// The error for the unknown key at `path`, with the nearest known key of its section.
pub fn error(file: &str, path: &str) -> ConfigError {
    let (parent, key) = match path.rfind('.') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => ("", path),
    };
    let suggestion = nearest(key, known_keys(parent)).map(str::to_string);
    ConfigError {
        file: file.to_string(),
        line: None,
        key: path.to_string(),
        problem: Problem::UnknownKey { key: key.to_string(), suggestion },
    }
}

/// The keys a section of the file may hold, read from the raw types themselves (so they
/// cannot drift from what the parser accepts). `parent` is a key path; indices are ignored.
fn known_keys(parent: &str) -> &'static [&'static str] {
    let mut section = String::with_capacity(parent.len());
    let mut in_index = false;
    for c in parent.chars() {
        match c {
            '[' => in_index = true,
            ']' => in_index = false,
            c if !in_index => section.push(c),
            _ => {}
        }
    }
    match section.as_str() {
        "" => fields_of::<raw::RawConfig>(),
        "access_log" => fields_of::<raw::RawAccessLog>(),
        "listeners" => fields_of::<raw::RawListener>(),
        "routes" => fields_of::<raw::RawRoute>(),
        "routes.match" => fields_of::<raw::RawMatch>(),
        "routes.retry" => fields_of::<raw::RawRetry>(),
        "routes.timeouts" => fields_of::<raw::RawTimeouts>(),
        "routes.respond" => fields_of::<raw::RawRespond>(),
        "routes.redirect" => fields_of::<raw::RawRedirect>(),
        "routes.request_headers" | "routes.response_headers" => fields_of::<raw::RawHeaderEdits>(),
        "routes.replace_prefix" => fields_of::<raw::RawReplacePrefix>(),
        "routes.compression" => fields_of::<raw::RawCompression>(),
        "listeners.proxy_protocol" => fields_of::<raw::RawProxyProtocol>(),
        "listeners.rate_limit" => fields_of::<raw::RawRateLimit>(),
        "listeners.tls" => fields_of::<raw::RawTls>(),
        "listeners.tls.certificates" => fields_of::<raw::RawCertPair>(),
        "listeners.tls.client_auth" => fields_of::<raw::RawClientAuth>(),
        "clusters" => fields_of::<raw::RawCluster>(),
        "clusters.health_check" => fields_of::<raw::RawHealthCheck>(),
        "clusters.outlier_detection" => fields_of::<raw::RawOutlier>(),
        "clusters.tls" => fields_of::<raw::RawUpstreamTls>(),
        "clusters.tls.client_cert" => fields_of::<raw::RawCertPair>(),
        _ => &[],
    }
}

/// The known key closest to `key` by edit distance, if it is close enough to be a typo.
fn nearest<'k>(key: &str, known: &[&'k str]) -> Option<&'k str> {
    let (best, distance) =
        known.iter().map(|k| (*k, edit_distance(key, k))).min_by_key(|(_, d)| *d)?;
    // A third of the word may be wrong (`adress`, `endpionts`, `intervl`), at least one edit.
    (distance <= (key.len() / 3).max(1)).then_some(best)
}

/// Levenshtein distance, counting a swap of two neighbours as one edit.
fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    let mut prev2: Vec<usize> = vec![0; b.len() + 1];
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for i in 1..=a.len() {
        let mut cur = vec![i; b.len() + 1];
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            cur[j] = (prev[j] + 1).min(cur[j - 1] + 1).min(prev[j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                cur[j] = cur[j].min(prev2[j - 2] + 1);
            }
        }
        prev2 = std::mem::replace(&mut prev, cur);
    }
    prev[b.len()]
}

/// The field names a derived `Deserialize` struct asks for: a deserializer that only listens
/// to `deserialize_struct` and then gives up.
fn fields_of<'de, T: Deserialize<'de>>() -> &'static [&'static str] {
    struct Names(Option<&'static [&'static str]>);
    #[derive(Debug)]
    struct Stop;
    impl std::fmt::Display for Stop {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("field names read")
        }
    }
    impl std::error::Error for Stop {}
    impl de::Error for Stop {
        fn custom<T: std::fmt::Display>(_: T) -> Self {
            Stop
        }
    }
    impl<'de> Deserializer<'de> for &mut Names {
        type Error = Stop;
        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Stop> {
            Err(Stop)
        }
        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Stop> {
            self.0 = Some(fields);
            Err(Stop)
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
            byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map enum
            identifier ignored_any
        }
    }
    let mut names = Names(None);
    let _ = T::deserialize(&mut names);
    names.0.unwrap_or(&[])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typos_get_the_nearest_known_key() {
        assert_eq!(nearest("adress", known_keys("listeners[0]")), Some("address"));
        assert_eq!(nearest("endpionts", known_keys("clusters[3]")), Some("endpoints"));
        assert_eq!(nearest("intervl", known_keys("clusters[0].health_check")), Some("interval"));
        assert_eq!(nearest("colour", known_keys("listeners[0]")), None);
        assert!(known_keys("routes[1].match").contains(&"path_prefix"));
    }
}
