//! Service attribution, live: storming processes in cgroups laid out the
//! way systemd and the kubelet lay them out (created by the test), with a
//! container runtime's metadata file under a temporary metadata root, are
//! named by service in `incidents`, `explain`, `top`, `watch` and the
//! metrics. The layouts of every runtime are covered with fixtures in
//! `detector/src/ingest/service/tests.rs`; this shows the daemon wires
//! them through.
use std::{
    io::{Read, Write},
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use stormguard_tests::{Cgroup, ChildGuard, Daemon, closed_port, stormguard, wait_for};

const CLIENT: &str = env!("CARGO_BIN_EXE_stormclient");

/// A cgroup subtree of the test (a slice and the cgroups in it), removed
/// when dropped — after its members are gone.
struct Slice {
    root: PathBuf,
    children: Vec<Cgroup>,
}

impl Slice {
    fn create(name: &str) -> Slice {
        let mounts = std::fs::read_to_string("/proc/mounts").expect("mounts");
        let base = stormguard::kernel::find_cgroup2(&mounts).expect("cgroup2 mount");
        let root = base.join(name);
        std::fs::create_dir_all(&root).expect("create slice");
        Slice {
            root,
            children: Vec::new(),
        }
    }

    /// A cgroup at `rel` below the slice (parents created).
    fn child(&mut self, rel: &str) -> &Cgroup {
        let path = self.root.join(rel);
        std::fs::create_dir_all(&path).expect("create cgroup");
        self.children.push(Cgroup { path });
        self.children.last().unwrap()
    }
}

impl Drop for Slice {
    fn drop(&mut self) {
        // Leaves first (Cgroup's own drop waits for stragglers), then the
        // directories between them and the slice, deepest first.
        let mut dirs: Vec<PathBuf> = self
            .children
            .iter()
            .flat_map(|c| {
                c.path
                    .ancestors()
                    .map(Path::to_path_buf)
                    .collect::<Vec<_>>()
            })
            .filter(|p| p.starts_with(&self.root) && *p != self.root)
            .collect();
        self.children.clear();
        dirs.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        dirs.dedup();
        for d in dirs {
            let _ = std::fs::remove_dir(d);
        }
        let _ = std::fs::remove_dir(&self.root);
    }
}

fn scrape(addr: std::net::SocketAddr) -> String {
    let mut s = std::net::TcpStream::connect(addr).expect("connect to metrics");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    body
}

#[test]
fn storms_are_named_by_unit_container_and_pod() {
    let tag = std::process::id();
    let dir = std::env::temp_dir().join(format!("sg-services-{tag}"));
    // A Docker container of a Kubernetes pod (dockershim's labels), its
    // metadata where Docker keeps it, under the test's metadata root.
    let id = format!("{:0>64x}", 0x5eed_0000_u64 + tag as u64);
    let uid = "6f1c2d3e-4a5b-4c6d-8e9f-0a1b2c3d4e5f";
    let meta = dir.join("host/var/lib/docker/containers").join(&id);
    std::fs::create_dir_all(&meta).unwrap();
    std::fs::write(
        meta.join("config.v2.json"),
        serde_json::json!({
            "ID": id,
            "Name": "/k8s_checkout_checkout-7d9f-x2kqp_shop",
            "Config": {"Labels": {
                "io.kubernetes.pod.namespace": "shop",
                "io.kubernetes.pod.name": "checkout-7d9f-x2kqp",
                "io.kubernetes.container.name": "checkout",
            }},
        })
        .to_string(),
    )
    .unwrap();

    let mut slice = Slice::create(&format!("sgtest-{tag}.slice"));
    let unit = format!("sgtest-web-{tag}.service");
    let web = slice.child(&unit).path.clone();
    let pod = slice
        .child(&format!(
            "sgtest-pods.slice/kubepods-pod{}.slice/docker-{id}.scope",
            uid.replace('-', "_")
        ))
        .path
        .clone();

    let extra = format!(
        "per_storm = true\n[services]\nmetadata_root = \"{}\"\n",
        dir.join("host").display()
    );
    let Some(mut d) = Daemon::start("services", &dir, &extra) else {
        return;
    };
    let storm_in = |cgroup: &Path, port: &str| {
        let c = Cgroup {
            path: cgroup.to_path_buf(),
        };
        let cmd = c
            .exec_in(CLIENT, &["storm", "--addr", port, "--secs", "12"])
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn storm");
        // The cgroup stays (Slice removes it); only the handle goes.
        std::mem::forget(c);
        ChildGuard(cmd)
    };
    let (web_port, pod_port) = (
        closed_port(false).to_string(),
        closed_port(false).to_string(),
    );
    let web_storm = storm_in(&web, &web_port);
    let pod_storm = storm_in(&pod, &pod_port);

    let (incidents, took) = wait_for("both incidents", Duration::from_secs(20), || {
        let list = d.json(&["incidents", "--active"]);
        let list = list.as_array()?.clone();
        let find = |port: &str| {
            list.iter()
                .find(|i| i["destination"] == port && i["service"].is_object())
                .cloned()
        };
        Some((find(&web_port)?, find(&pod_port)?))
    });
    println!("services: both incidents named after {took:?}");
    let (web_inc, pod_inc) = incidents;
    assert_eq!(web_inc["service"]["kind"], "systemd", "{web_inc}");
    assert_eq!(web_inc["service"]["name"], unit.as_str(), "{web_inc}");
    assert_eq!(web_inc["unit"], unit.as_str());
    assert_eq!(pod_inc["service"]["kind"], "kubernetes", "{pod_inc}");
    assert_eq!(pod_inc["service"]["name"], "shop/checkout-7d9f-x2kqp");
    assert_eq!(pod_inc["service"]["namespace"], "shop");
    assert_eq!(pod_inc["service"]["container_name"], "checkout");
    assert_eq!(pod_inc["service"]["pod_uid"], uid);
    assert_eq!(pod_inc["service"]["container_id"], id.as_str());

    // explain and the incidents table name them too.
    let id_of = |i: &serde_json::Value| i["id"].as_str().unwrap().to_string();
    let out = d.cli(&["explain", &id_of(&pod_inc)]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!(
            "service    shop/checkout-7d9f-x2kqp (kubernetes), container checkout, id {}, pod uid {uid}",
            &id[..12]
        )),
        "{text}"
    );
    let out = d.cli(&["incidents", "--active"]);
    let table = String::from_utf8_lossy(&out.stdout);
    let row = table
        .lines()
        .find(|l| l.starts_with(&format!("{} ", id_of(&web_inc))))
        .unwrap_or_else(|| panic!("no row for {web_inc}:\n{table}"));
    assert!(row.contains(&stormguard::cli::keep_end(&unit, 20)), "{row}");

    // top: each storming flow with its service.
    let (flows, _) = wait_for("top's flows with services", Duration::from_secs(10), || {
        let top = d.json(&["top", "--iterations", "1"]);
        let flows = top["flows"].as_array()?.clone();
        let svc = |port: &str| {
            flows
                .iter()
                .find(|f| f["destination"] == port)
                .and_then(|f| f["service"].as_str().map(str::to_string))
        };
        Some((svc(&web_port)?, svc(&pod_port)?))
    });
    assert_eq!(
        flows,
        (unit.clone(), "shop/checkout-7d9f-x2kqp".to_string())
    );

    // The metrics: one series per service, on by default.
    let addr = d.metrics.expect("metrics port");
    let (body, _) = wait_for("per-service series", Duration::from_secs(10), || {
        let body = scrape(addr);
        (body.contains(&format!(
            "stormguard_service_storms_active{{service=\"{unit}\"}} 1"
        )) && body
            .contains("stormguard_service_storms_active{service=\"shop/checkout-7d9f-x2kqp\"} 1"))
        .then_some(body)
    });
    assert!(
        body.contains(&format!(
            "stormguard_service_storm_attempts_per_second{{service=\"{unit}\"}}"
        )),
        "{body}"
    );

    // watch (its own probes) names the unit in its table and JSON.
    let out = stormguard(["watch", "--json", "--duration", "3"]);
    let text = String::from_utf8_lossy(&out.stdout);
    let row = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["destination"] == web_port.as_str())
        .unwrap_or_else(|| {
            panic!(
                "watch did not show the storm to {web_port}:\n{text}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    assert_eq!(row["service"]["name"], unit.as_str(), "{row}");

    drop(web_storm);
    drop(pod_storm);
    d.stop();
    drop(slice);
    let _ = std::fs::remove_dir_all(&dir);
}
