//! The command line: running the default config, `apex check`, `apex proxy`, drivers, ports.

mod support;

use std::process::Command;

use support::*;

fn default_config_serves_status_page(rt: &str) {
    // The shipped config, moved to an ephemeral port so the test never collides.
    let text = std::fs::read_to_string("configs/apex.yaml").unwrap();
    assert!(text.contains("127.0.0.1:8080"));
    let mut apex = Apex::start(&text.replace("127.0.0.1:8080", "127.0.0.1:0"), rt);
    let mut c = Wire::connect(apex.addr);
    let r = c.request("GET / HTTP/1.1\r\nHost: localhost\r\n\r\n");
    assert_eq!(r.status, 200);
    assert!(r.text().contains("Apex is running"), "{}", r.text());
    let r = c.request("GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n");
    assert_eq!((r.status, r.text().as_str()), (200, "ok\n"));
    let r = c.request("HEAD / HTTP/1.1\r\nHost: localhost\r\n\r\n");
    assert_eq!(r.status, 200);
    assert!(r.body.is_empty());
    assert!(apex.wait_for_log(&["worker starting"]).is_some());
}

fn runtime_flag_selects_the_driver(rt: &str) {
    let mut apex = Apex::start(
        &config("  - { match: { path: \"/\" }, respond: { status: 204 } }", "  []"),
        rt,
    );
    let line = apex.wait_for_log(&["worker starting"]).unwrap();
    assert_eq!(field(&line, "driver"), Some(rt), "{line}");
    if rt == "io_uring" {
        assert!(line.contains("single_issuer+defer_taskrun"), "{line}");
    }
}

fn each_worker_pins_and_logs_its_driver(rt: &str) {
    let yaml = config("  - { match: { path: \"/\" }, respond: { status: 204 } }", "  []")
        .replace("workers: 1", "workers: 2");
    let mut apex = Apex::start(&yaml, rt);
    let logs = apex.logs();
    let workers: Vec<&str> = logs.lines().filter(|l| l.contains("worker starting")).collect();
    assert_eq!(workers.len(), 2, "{logs}");
    for w in workers {
        assert_eq!(field(w, "driver"), Some(rt), "{w}");
        assert!(w.contains("pin=cpu"), "{w}");
    }
}

fn second_instance_on_same_port_fails_clearly(rt: &str) {
    let yaml = config("  - { match: { path: \"/\" }, respond: { status: 204 } }", "  []");
    let first = Apex::start(&yaml, rt);
    let dir = TempDir::new();
    let taken = yaml.replace("127.0.0.1:0", &first.addr.to_string());
    let path = dir.write("second.yaml", &taken);
    let out = Command::new(apex_bin())
        .args(["--config", path.to_str().unwrap(), "--runtime", rt])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("address {} is already in use", first.addr)), "{err}");
    // And the first instance still serves.
    let r = Wire::connect(first.addr).request("GET / HTTP/1.1\r\nHost: a\r\n\r\n");
    assert_eq!(r.status, 204);
}

fn quick_proxy_mode_balances_round_robin(rt: &str) {
    let a = Upstream::ok("a");
    let b = Upstream::ok("b");
    let apex = Apex::spawn(&[
        "proxy",
        "--listen",
        "127.0.0.1:0",
        "--to",
        &a.addr.to_string(),
        "--to",
        &b.addr.to_string(),
        "--workers",
        "1",
        "--runtime",
        rt,
    ])
    .unwrap();
    let mut c = Wire::connect(apex.addr);
    let bodies: Vec<String> =
        (0..6).map(|_| c.request("GET / HTTP/1.1\r\nHost: x\r\n\r\n").text()).collect();
    let count_a = bodies.iter().filter(|b| *b == "a").count();
    assert_eq!(count_a, 3, "{bodies:?}");
    assert!(bodies.windows(2).all(|w| w[0] != w[1]), "alternates per request: {bodies:?}");
}

under_each_driver!(
    default_config_serves_status_page,
    runtime_flag_selects_the_driver,
    each_worker_pins_and_logs_its_driver,
    second_instance_on_same_port_fails_clearly,
    quick_proxy_mode_balances_round_robin,
);

#[test]
fn check_accepts_the_default_config() {
    let out =
        Command::new(apex_bin()).args(["check", "--config", "configs/apex.yaml"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok"));
}

#[test]
fn check_reports_file_key_path_and_problem() {
    let (code, err, file) = apex_check(
        "listeners:\n  - { name: a, address: \"127.0.0.1:1\" }\nroutes:\n  - { match: { path: \"/\" }, cluster: nope }\nclusters:\n  - { name: c, endpoints: [], connect_timeout: 0s }\n",
    );
    assert_eq!(code, Some(1));
    for want in [
        "4: routes[0].cluster: no cluster is named `nope`",
        "6: clusters[0].endpoints: a cluster needs at least one endpoint",
        "6: clusters[0].connect_timeout: must be greater than zero",
    ] {
        assert!(err.contains(&format!("{file}:{want}")), "{err}");
    }
}

#[test]
fn check_names_unknown_keys_with_their_line() {
    let (code, err, file) = apex_check("listeners:\n  - name: a\n    adress: 127.0.0.1:1\n");
    assert_eq!(code, Some(1));
    assert!(err.contains(&format!("{file}:3")), "file and line: {err}");
    assert!(
        err.contains("listeners[0].adress: unknown key `adress`; did you mean `address`?"),
        "{err}"
    );
    assert!(err.contains("listeners[0]: missing field `address`"), "the key path once: {err}");
}

#[test]
fn check_takes_the_file_as_an_argument_and_warns_about_unused_clusters() {
    let dir = TempDir::new();
    let path = dir.write(
        "spare.yaml",
        "listeners: [ { name: a, address: \"127.0.0.1:1\" } ]\nclusters:\n  - { name: spare, endpoints: [\"127.0.0.1:2\"] }\n",
    );
    let out = std::process::Command::new(apex_bin())
        .args(["check", path.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(
        err.contains(&format!(
            "warning: {}:3: clusters[0]: no route uses cluster `spare`",
            path.display()
        )),
        "{err}"
    );
}

#[test]
fn a_host_name_endpoint_logs_the_address_it_resolved_to() {
    let up = Upstream::ok("named");
    let yaml = proxy_config(&[up.addr], "")
        .replace(&format!("\"{}\"", up.addr), &format!("\"localhost:{}\"", up.addr.port()));
    let mut apex = Apex::start(&yaml, "epoll");
    let line = apex.wait_for_log(&["endpoint resolved"]).expect("a log line");
    assert!(line.contains(&format!("endpoint=localhost:{}", up.addr.port())), "{line}");
    assert!(line.contains("address=127.0.0.1:") || line.contains("address=[::1]:"), "{line}");
}

#[test]
fn apex_proxy_takes_a_policy_retries_and_a_health_check() {
    let up = Upstream::start(|r, w| {
        let status = if r.request_line().contains("/ready") { "503 No" } else { "200 OK" };
        w.send(format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n").as_bytes());
        After::KeepOpen
    });
    let to = up.addr.to_string();
    let args = [
        "proxy",
        "--listen",
        "127.0.0.1:0",
        "--to",
        &to,
        "--workers",
        "1",
        "--policy",
        "least_request",
        "--retries",
        "3",
        "--health-check",
        "/ready",
    ];
    let mut apex = Apex::spawn(&args).unwrap_or_else(|l| panic!("{l}"));
    apex.wait_for_log(&["endpoint unhealthy", &to]).expect("the health check probes /ready");
    let bad =
        Apex::spawn(&["proxy", "--listen", "127.0.0.1:0", "--to", &to, "--policy", "fastest"]);
    let Err(logs) = bad else { panic!("an unknown policy must not start") };
    assert!(logs.contains("--policy `fastest`"), "{logs}");
}

#[test]
fn a_bad_config_refuses_to_start_and_says_why() {
    let dir = TempDir::new();
    let path = dir.write("bad.yaml", "listeners: []\n");
    let out = Command::new(apex_bin()).args(["--config", path.to_str().unwrap()]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("listeners: at least one listener is required"), "{err}");
}

/// Makes `io_uring_setup` fail with ENOSYS in the child, as a container's seccomp profile does.
#[cfg(target_arch = "x86_64")]
fn refuse_io_uring(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    const NR_IO_URING_SETUP: u32 = 425;
    let filter = [
        // Load the syscall number (offset 0 of struct seccomp_data).
        libc::sock_filter { code: 0x20, jt: 0, jf: 0, k: 0 },
        // Equal to io_uring_setup? Fall through to ERRNO; else skip to ALLOW.
        libc::sock_filter { code: 0x15, jt: 0, jf: 1, k: NR_IO_URING_SETUP },
        libc::sock_filter { code: 0x06, jt: 0, jf: 0, k: 0x0005_0000 | libc::ENOSYS as u32 },
        libc::sock_filter { code: 0x06, jt: 0, jf: 0, k: 0x7fff_0000 },
    ];
    // SAFETY: the closure runs in the forked child before exec and only calls prctl, which is
    // async-signal-safe; `filter` is copied into the closure and outlives both calls.
    unsafe {
        cmd.pre_exec(move || {
            let prog =
                libc::sock_fprog { len: filter.len() as u16, filter: filter.as_ptr() as *mut _ };
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                || libc::prctl(libc::PR_SET_SECCOMP, libc::SECCOMP_MODE_FILTER, &prog) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[cfg(target_arch = "x86_64")]
#[test]
fn refused_io_uring_falls_back_to_epoll_and_says_why() {
    let dir = TempDir::new();
    let yaml =
        config("  - { match: { path: \"/\" }, respond: { status: 200, body: \"up\" } }", "  []");
    let path = dir.write("apex.yaml", &yaml);
    let mut apex =
        Apex::spawn_with(&["--config", path.to_str().unwrap()], refuse_io_uring).unwrap();
    let line = apex.wait_for_log(&["worker starting"]).unwrap();
    assert!(line.contains("WARN"), "{line}");
    assert_eq!(field(&line, "driver"), Some("epoll"), "{line}");
    assert!(line.contains("io_uring unavailable"), "{line}");
    let r = Wire::connect(apex.addr).request("GET / HTTP/1.1\r\nHost: a\r\n\r\n");
    assert_eq!(r.text(), "up");
}
