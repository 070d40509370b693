//! Validation of the edge settings: client networks (PROXY protocol, trusted proxies, allow
//! and deny), forwarding fields, client limits, and the header and path edits of routes.

use super::defaults;
use super::error::Problem;
use super::model::{Compression, Http2, TlsListener, UpstreamTls};
use super::model::{ProxyProtocolIn, RateLimit, RouteEdits, Template, TemplatePart};
use super::raw::{
    RawCompression, RawHeaderEdits, RawProxyProtocol, RawRateLimit, RawReplacePrefix,
};
use super::raw::{RawHttp2, RawTls, RawUpstreamTls};
use super::units::is_token;
use super::validate::Validator;
use crate::http::encoding::Encoding;
use crate::http::request::ForwardedStyle;
use crate::http::rewrite::{Cidr, PathEdit};
use std::path::Path;

/// Fields a route may never set, add or remove: they describe one hop or the message's framing,
/// which Apex itself manages (or, for `host`, `host_rewrite` does).
const MANAGED_FIELDS: [&str; 11] = [
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-connection",
    "proxy-authorization",
    "content-length",
    "host",
    "expect",
];

impl Validator<'_> {
    /// A list of networks (`10.0.0.0/8`, `::1`).
    pub(super) fn cidrs(&mut self, key: &str, raw: &[String]) -> Vec<Cidr> {
        let mut nets = Vec::new();
        for (i, n) in raw.iter().enumerate() {
            match Cidr::parse(n) {
                Some(c) => nets.push(c),
                None => self.err(format!("{key}[{i}]"), Problem::BadNetwork(n.clone())),
            }
        }
        nets
    }

    pub(super) fn proxy_protocol_in(
        &mut self,
        p: &str,
        raw: &Option<RawProxyProtocol>,
    ) -> Option<ProxyProtocolIn> {
        let r = raw.as_ref()?;
        let p = format!("{p}.proxy_protocol");
        let (mut v1, mut v2) = (false, false);
        for (i, v) in r.accept.iter().enumerate() {
            match v.as_str() {
                "v1" => v1 = true,
                "v2" => v2 = true,
                other => {
                    self.err(format!("{p}.accept[{i}]"), Problem::BadProxyVersion(other.into()))
                }
            }
        }
        if r.accept.is_empty() {
            (v1, v2) = (true, true);
        }
        let trusted = self.cidrs(&format!("{p}.trusted"), &r.trusted);
        if r.trusted.is_empty() {
            self.err(format!("{p}.trusted"), Problem::NoTrustedSources);
        }
        Some(ProxyProtocolIn { v1, v2, trusted, required: r.required.unwrap_or(true) })
    }

    pub(super) fn forwarded_style(&mut self, p: &str, raw: &Option<String>) -> ForwardedStyle {
        match raw.as_deref() {
            None | Some("x_forwarded") => ForwardedStyle::XForwarded,
            Some("forwarded") => ForwardedStyle::Forwarded,
            Some(other) => {
                self.err(
                    format!("{p}.forwarded_headers"),
                    Problem::BadForwardedStyle(other.into()),
                );
                ForwardedStyle::XForwarded
            }
        }
    }

    /// A listener's `http2`: `prior_knowledge`, `off`, or a map of settings.
    pub(super) fn http2(&mut self, p: &str, raw: &Option<RawHttp2>) -> Http2 {
        let mut h = defaults::HTTP2;
        let p = format!("{p}.http2");
        let s = match raw {
            None => return h,
            Some(RawHttp2::Mode(m)) => {
                match m.as_str() {
                    "prior_knowledge" => h.prior_knowledge = true,
                    "off" => {}
                    _ => self.err(p, Problem::BadHttp2(m.clone())),
                }
                return h;
            }
            Some(RawHttp2::Settings(s)) => s,
        };
        h.prior_knowledge = s.prior_knowledge.unwrap_or(false);
        let d = defaults::HTTP2;
        h.max_concurrent_streams = self.count(
            format!("{p}.max_concurrent_streams"),
            s.max_concurrent_streams,
            d.max_concurrent_streams,
            1,
            10_000,
            "from 1 to 10000",
        );
        if let Some(n) = self.size(format!("{p}.max_header_list_size"), &s.max_header_list_size) {
            h.max_header_list_size = u32::try_from(n).unwrap_or(u32::MAX);
        }
        h.max_pending_resets = self.count(
            format!("{p}.max_pending_resets"),
            s.max_pending_resets,
            d.max_pending_resets,
            1,
            100_000,
            "from 1 to 100000",
        );
        h.max_resets_sent = self.count(
            format!("{p}.max_resets_sent"),
            s.max_resets_sent,
            d.max_resets_sent,
            1,
            1_000_000,
            "from 1 to 1000000",
        );
        let per_second = |v: &mut Self, key: &str, raw: Option<i64>, default: u32| {
            v.count(format!("{p}.{key}"), raw, default, 1, 1_000_000, "from 1 to 1000000")
        };
        let f = d.floods;
        h.floods.pings = per_second(self, "max_pings_per_second", s.max_pings_per_second, f.pings);
        h.floods.settings =
            per_second(self, "max_settings_per_second", s.max_settings_per_second, f.settings);
        h.floods.empty_data = per_second(
            self,
            "max_empty_data_per_second",
            s.max_empty_data_per_second,
            f.empty_data,
        );
        h.floods.window_updates = per_second(
            self,
            "max_window_updates_per_second",
            s.max_window_updates_per_second,
            f.window_updates,
        );
        h.floods.resets =
            per_second(self, "max_resets_per_second", s.max_resets_per_second, f.resets);
        h.floods.continuations = self.count(
            format!("{p}.max_continuations"),
            s.max_continuations,
            f.continuations,
            1,
            1000,
            "from 1 to 1000",
        );
        let key = format!("{p}.max_decoded_header_bytes");
        if let Some(n) = self.size(key, &s.max_decoded_header_bytes) {
            h.floods.decoded_header_bytes = n;
        }
        h.max_requests_per_connection = self.count(
            format!("{p}.max_requests_per_connection"),
            s.max_requests_per_connection,
            d.max_requests_per_connection,
            1,
            100_000_000,
            "from 1 to 100000000",
        );
        h
    }

    pub(super) fn rate_limit(&mut self, p: &str, raw: &Option<RawRateLimit>) -> Option<RateLimit> {
        let r = raw.as_ref()?;
        let p = format!("{p}.rate_limit");
        if !(r.requests_per_second > 0.0 && r.requests_per_second <= 1e6) {
            self.err(format!("{p}.requests_per_second"), Problem::BadRate);
            return None;
        }
        // A burst of one second's worth by default, at least one request.
        let default_burst = (r.requests_per_second.ceil() as u32).max(1);
        let burst = self.count(
            format!("{p}.burst"),
            r.burst,
            default_burst,
            1,
            1_000_000,
            "from 1 to 1000000",
        );
        Some(RateLimit { per_second: r.requests_per_second, burst })
    }

    /// `set`/`add`/`remove` of a route's request or response fields.
    pub(super) fn edits(&mut self, key: &str, raw: &Option<RawHeaderEdits>) -> Option<RouteEdits> {
        let r = raw.as_ref()?;
        let mut edits = RouteEdits::default();
        let name_ok = |v: &mut Self, k: String, name: &str| {
            let lower = name.to_ascii_lowercase();
            if !is_token(name) || MANAGED_FIELDS.contains(&lower.as_str()) {
                v.err(k, Problem::ManagedField(name.to_string()));
                return None;
            }
            Some(lower)
        };
        for (i, name) in r.remove.iter().enumerate() {
            if let Some(n) = name_ok(self, format!("{key}.remove[{i}]"), name) {
                edits.remove.push(n);
            }
        }
        for (section, list, out) in
            [("set", &r.set, &mut edits.set), ("add", &r.add, &mut edits.add)]
        {
            for (name, value) in list {
                let k = format!("{key}.{section}.{name}");
                let n = name_ok(self, k.clone(), name);
                if let (Some(n), Some(t)) = (n, self.template(&k, value)) {
                    out.push((n, t));
                }
            }
        }
        Some(edits)
    }

    /// A field value with `${client_ip}`, `${request_id}`, `${host}`; nothing a field value
    /// may not hold.
    pub(super) fn template(&mut self, key: &str, raw: &str) -> Option<Template> {
        if raw.bytes().any(|b| b != b'\t' && (b < b' ' || b == 0x7f)) {
            self.err(key.to_string(), Problem::BadHeader(raw.to_string()));
            return None;
        }
        let mut parts = Vec::new();
        let mut rest = raw;
        while let Some(start) = rest.find("${") {
            if start > 0 {
                parts.push(TemplatePart::Text(rest[..start].to_string()));
            }
            let Some(end) = rest[start..].find('}') else {
                self.err(key.to_string(), Problem::BadVariable(rest[start..].to_string()));
                return None;
            };
            let part = match &rest[start + 2..start + end] {
                "client_ip" => TemplatePart::ClientIp,
                "request_id" => TemplatePart::RequestId,
                "host" => TemplatePart::Host,
                other => {
                    self.err(key.to_string(), Problem::BadVariable(other.to_string()));
                    return None;
                }
            };
            parts.push(part);
            rest = &rest[start + end + 1..];
        }
        if !rest.is_empty() {
            parts.push(TemplatePart::Text(rest.to_string()));
        }
        Some(Template(parts))
    }

    pub(super) fn compression(
        &mut self,
        p: &str,
        raw: &Option<RawCompression>,
    ) -> Option<Compression> {
        let r = raw.as_ref()?;
        let p = format!("{p}.compression");
        let encodings = match &r.encodings {
            None => defaults::COMPRESSION_ENCODINGS.to_vec(),
            Some(list) => {
                let mut out = Vec::new();
                for (i, e) in list.iter().enumerate() {
                    match Encoding::parse(e) {
                        Some(e) if !out.contains(&e) => out.push(e),
                        _ => {
                            self.err(format!("{p}.encodings[{i}]"), Problem::BadEncoding(e.clone()))
                        }
                    }
                }
                out
            }
        };
        let types = match &r.types {
            None => defaults::COMPRESSION_TYPES.iter().map(|t| t.to_string()).collect(),
            Some(list) => {
                let mut out = Vec::new();
                for (i, t) in list.iter().enumerate() {
                    let valid = t
                        .split_once('/')
                        .is_some_and(|(a, b)| is_token(a) && (b == "*" || is_token(b)));
                    if valid {
                        out.push(t.to_ascii_lowercase());
                    } else {
                        self.err(format!("{p}.types[{i}]"), Problem::BadMediaType(t.clone()));
                    }
                }
                out
            }
        };
        Some(Compression {
            encodings,
            gzip_level: self.count(
                format!("{p}.gzip_level"),
                r.gzip_level,
                defaults::GZIP_LEVEL,
                1,
                9,
                "from 1 to 9",
            ),
            brotli_quality: self.count(
                format!("{p}.brotli_quality"),
                r.brotli_quality,
                defaults::BROTLI_QUALITY,
                0,
                11,
                "from 0 to 11",
            ),
            min_size: self
                .size(format!("{p}.min_size"), &r.min_size)
                .unwrap_or(defaults::COMPRESSION_MIN_SIZE),
            types,
        })
    }

    /// A listener's TLS block: every certificate and key is read and checked now (readable,
    /// key matching, at least one DNS SAN), so a bad file is a refused config or reload.
    pub(super) fn tls(&mut self, p: &str, raw: &Option<RawTls>) -> Option<TlsListener> {
        let r = raw.as_ref()?;
        let p = format!("{p}.tls");
        if r.certificates.is_empty() {
            self.err(format!("{p}.certificates"), Problem::NoCertificates);
            return None;
        }
        let mut loaded = Vec::new();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        for (i, c) in r.certificates.iter().enumerate() {
            let ocsp = c.ocsp.as_deref().map(Path::new);
            match crate::tls::load_cert(Path::new(&c.cert), Path::new(&c.key), ocsp) {
                Ok(l) => {
                    if l.not_after.is_some_and(|t| t < now) {
                        let key = format!("{p}.certificates[{i}]");
                        self.warn(key, Problem::ExpiredCertificate(c.cert.clone()));
                    }
                    loaded.push(l)
                }
                Err(e @ crate::tls::CertError::BadOcsp(_)) => self.err(
                    format!("{p}.certificates[{i}].ocsp"),
                    Problem::BadCertificate(e.to_string()),
                ),
                Err(e) => self
                    .err(format!("{p}.certificates[{i}]"), Problem::BadCertificate(e.to_string())),
            }
        }
        let default = match r.default_certificate {
            None => 0,
            Some(i) if i >= 0 && (i as usize) < r.certificates.len() => i as usize,
            Some(_) => {
                self.err(format!("{p}.default_certificate"), Problem::BadIndex);
                0
            }
        };
        let tls13_only = match r.min_version.as_deref() {
            None | Some("1.2") => false,
            Some("1.3") => true,
            Some(other) => {
                self.err(format!("{p}.min_version"), Problem::BadTlsVersion(other.into()));
                false
            }
        };
        let alpn = match &r.alpn {
            None => vec!["http/1.1".to_string()],
            Some(list) => {
                for (i, a) in list.iter().enumerate() {
                    if a != "http/1.1" && a != "h2" {
                        self.err(format!("{p}.alpn[{i}]"), Problem::BadAlpn(a.clone()));
                    }
                }
                list.clone()
            }
        };
        let handshake_timeout = self.duration(
            format!("{p}.handshake_timeout"),
            &r.handshake_timeout,
            defaults::HANDSHAKE_TIMEOUT,
        );
        let client_auth = r.client_auth.as_ref().and_then(|a| {
            let required = a.required.unwrap_or(true);
            match crate::tls::client_verifier(Path::new(&a.ca), required) {
                Ok(v) => Some(v),
                Err(e) => {
                    self.err(format!("{p}.client_auth.ca"), Problem::BadCertificate(e.to_string()));
                    None
                }
            }
        });
        if loaded.len() != r.certificates.len() {
            return None;
        }
        let certs = std::sync::Arc::new(crate::tls::CertStore::new(&loaded, default));
        let expiry = loaded.iter().map(|l| (l.names[0].clone(), l.not_after)).collect();
        Some(TlsListener { certs, tls13_only, alpn, handshake_timeout, client_auth, expiry })
    }

    /// A cluster's TLS to its endpoints: a CA file when verifying (no system roots are
    /// loaded), an optional client certificate, an optional server name.
    pub(super) fn upstream_tls(
        &mut self,
        p: &str,
        raw: &Option<RawUpstreamTls>,
    ) -> Option<UpstreamTls> {
        let r = raw.as_ref()?;
        let p = format!("{p}.tls");
        let verify = r.verify.unwrap_or(true);
        let roots = match (&r.ca, verify) {
            (_, false) => None,
            (None, true) => {
                self.err(format!("{p}.ca"), Problem::NeedsCa);
                return None;
            }
            (Some(ca), true) => match crate::tls::root_store(Path::new(ca)) {
                Ok(r) => Some(std::sync::Arc::new(r)),
                Err(e) => {
                    self.err(format!("{p}.ca"), Problem::BadCertificate(e.to_string()));
                    return None;
                }
            },
        };
        let server_name = match &r.server_name {
            None => None,
            Some(n) => match rustls::pki_types::ServerName::try_from(n.clone()) {
                Ok(n) => Some(n),
                Err(_) => {
                    self.err(format!("{p}.server_name"), Problem::BadHost(n.clone()));
                    return None;
                }
            },
        };
        let client_cert = match &r.client_cert {
            None => None,
            Some(c) if c.ocsp.is_some() => {
                self.err(format!("{p}.client_cert.ocsp"), Problem::OcspOnClientCert);
                return None;
            }
            Some(c) => match crate::tls::load_cert(Path::new(&c.cert), Path::new(&c.key), None) {
                Ok(l) => Some(std::sync::Arc::new(l)),
                Err(e) => {
                    self.err(format!("{p}.client_cert"), Problem::BadCertificate(e.to_string()));
                    return None;
                }
            },
        };
        Some(UpstreamTls { server_name, roots, client_cert })
    }

    pub(super) fn path_edit(
        &mut self,
        p: &str,
        strip: &Option<String>,
        replace: &Option<RawReplacePrefix>,
    ) -> Option<PathEdit> {
        match (strip, replace) {
            (Some(_), Some(_)) => {
                self.err(p.to_string(), Problem::StripAndReplace);
                None
            }
            (Some(s), None) => {
                self.check_path(format!("{p}.strip_prefix"), s).then(|| PathEdit::Strip(s.clone()))
            }
            (None, Some(r)) => {
                let from = self.check_path(format!("{p}.replace_prefix.from"), &r.from);
                let to = self.check_path(format!("{p}.replace_prefix.to"), &r.to);
                (from && to).then(|| PathEdit::Replace { from: r.from.clone(), to: r.to.clone() })
            }
            (None, None) => None,
        }
    }
}
