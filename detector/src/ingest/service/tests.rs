//! Cgroup paths of each layout (systemd, Docker with the systemd and the
//! cgroupfs drivers, containerd and CRI-O under the kubelet with both
//! drivers, Podman) and runtime metadata files of each runtime, as
//! fixtures under `detector/tests/fixtures/host-root` (trimmed copies of
//! what each runtime writes: the keys read here, beside some it also
//! writes).
use std::path::PathBuf;

use super::*;

const CONTAINERD: &str = "3b1f0e5c7d2a4b6e8f9a0c1d2e3f405162738495a6b7c8d9e0f1a2b3c4d5e6f7";
const CRIO: &str = "a9e8d7c6b5a4938271605f4e3d2c1b0a99887766554433221100ffeeddccbbaa";
const DOCKER: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
const COMPOSE: &str = "fedcba9876543210fedcba9876543210fedcba9876543210fedcba9876543210";
const DOCKERSHIM: &str = "1111222233334444555566667777888899990000aaaabbbbccccddddeeeeffff";

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/host-root")
}

fn resolve(path: &str) -> Service {
    ServiceResolver::new(fixtures()).resolve(path)
}

#[test]
fn systemd_units() {
    let s = resolve("/system.slice/nginx.service");
    assert_eq!(
        (s.kind.as_str(), s.name.as_str()),
        ("systemd", "nginx.service")
    );
    // A user's service: the innermost unit, not user@1000.service.
    let s = resolve("/user.slice/user-1000.slice/user@1000.service/app.slice/sync.service");
    assert_eq!(s.name, "sync.service");
    let s = resolve("/user.slice/user-1000.slice/session-3.scope");
    assert_eq!(
        (s.kind.as_str(), s.name.as_str()),
        ("systemd", "session-3.scope")
    );
}

#[test]
fn host_processes() {
    assert_eq!(resolve("/"), Service::host());
    assert_eq!(resolve("/user.slice"), Service::host());
    assert_eq!(resolve("/init.scope").name, "init.scope");
}

#[test]
fn docker_systemd_driver_with_name() {
    let s = resolve(&format!("/system.slice/docker-{DOCKER}.scope"));
    assert_eq!(s.kind, "docker");
    assert_eq!(s.name, "flaky-poller");
    assert_eq!(s.container_id.as_deref(), Some(DOCKER));
    // The container's scope is not its unit.
    assert_eq!(s.unit, None);
}

#[test]
fn docker_cgroupfs_driver_and_compose_service() {
    let s = resolve(&format!("/docker/{COMPOSE}"));
    assert_eq!((s.kind.as_str(), s.name.as_str()), ("docker", "api"));
}

#[test]
fn container_without_metadata_is_named_by_short_id() {
    let id = "9".repeat(64);
    let s = resolve(&format!("/system.slice/docker-{id}.scope"));
    assert_eq!(
        (s.kind.as_str(), s.name.as_str()),
        ("docker", "999999999999")
    );
    let s = resolve(&format!("/machine.slice/libpod-{id}.scope/container"));
    assert_eq!(s.kind, "podman");
    let s = resolve(&format!("/lxc.payload/{id}"));
    assert_eq!(s.kind, "container");
}

#[test]
fn kubernetes_containerd_systemd_driver() {
    let s = resolve(&format!(
        "/kubepods.slice/kubepods-burstable.slice/\
         kubepods-burstable-pod6f1c2d3e_4a5b_4c6d_8e9f_0a1b2c3d4e5f.slice/\
         cri-containerd-{CONTAINERD}.scope"
    ));
    assert_eq!(s.kind, "kubernetes");
    assert_eq!(s.name, "shop/checkout-7d9f8b6c5-x2kqp");
    assert_eq!(s.namespace.as_deref(), Some("shop"));
    assert_eq!(s.pod.as_deref(), Some("checkout-7d9f8b6c5-x2kqp"));
    assert_eq!(s.container_name.as_deref(), Some("checkout"));
    assert_eq!(
        s.pod_uid.as_deref(),
        Some("6f1c2d3e-4a5b-4c6d-8e9f-0a1b2c3d4e5f")
    );
}

#[test]
fn paths_seen_from_inside_a_pods_cgroup_namespace() {
    // The daemon in a pod (its own cgroup namespace) reads other
    // processes' cgroups relative to its own.
    let s = resolve(&format!(
        "/../../kubepods-burstable.slice/\
         kubepods-burstable-pod6f1c2d3e_4a5b_4c6d_8e9f_0a1b2c3d4e5f.slice/\
         cri-containerd-{CONTAINERD}.scope"
    ));
    assert_eq!(s.name, "shop/checkout-7d9f8b6c5-x2kqp");
    assert_eq!(
        resolve("/../../system.slice/nginx.service").name,
        "nginx.service"
    );
}

#[test]
fn kubernetes_crio_and_cgroupfs_driver() {
    let s = resolve(&format!(
        "/kubepods/besteffort/pod0d9e8f7a-6b5c-4d3e-9f2a-1b0c9d8e7f6a/{CRIO}"
    ));
    assert_eq!(s.kind, "kubernetes");
    assert_eq!(s.name, "payments/payments-worker-0");
    assert_eq!(s.container_name.as_deref(), Some("worker"));
    assert_eq!(
        s.pod_uid.as_deref(),
        Some("0d9e8f7a-6b5c-4d3e-9f2a-1b0c9d8e7f6a")
    );
    let s = resolve(&format!(
        "/kubepods.slice/kubepods-besteffort.slice/\
         kubepods-besteffort-pod0d9e8f7a_6b5c_4d3e_9f2a_1b0c9d8e7f6a.slice/crio-{CRIO}.scope"
    ));
    assert_eq!(s.name, "payments/payments-worker-0");
}

#[test]
fn kubernetes_dockershim_labels() {
    let s = resolve(&format!(
        "/kubepods/pod9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d/{DOCKERSHIM}"
    ));
    assert_eq!(s.name, "catalog/search-5b6c7d8e9f-abcde");
    assert_eq!(s.container_name.as_deref(), Some("search"));
}

#[test]
fn pod_without_readable_metadata_is_named_by_uid() {
    let id = "7".repeat(64);
    let s = resolve(&format!(
        "/kubepods.slice/kubepods-pod12345678_9abc_def0_1234_56789abcdef0.slice/\
         cri-containerd-{id}.scope"
    ));
    assert_eq!(s.kind, "kubernetes");
    assert_eq!(s.name, "pod 12345678-9abc-def0-1234-56789abcdef0");
    // The pod's own cgroup (the pause container's parent).
    let s = resolve("/kubepods/burstable/pod12345678-9abc-def0-1234-56789abcdef0");
    assert_eq!(
        s.pod_uid.as_deref(),
        Some("12345678-9abc-def0-1234-56789abcdef0")
    );
}

#[test]
fn not_a_pod_uid() {
    assert_eq!(
        parse_path("/kubepods.slice/kubepods-besteffort.slice").pod_uid,
        None
    );
    assert_eq!(parse_path("/system.slice/podman.service").pod_uid, None);
    assert_eq!(
        parse_path("/podcast.service").unit.as_deref(),
        Some("podcast.service")
    );
}

#[test]
fn metadata_is_bounded_and_tolerant() {
    let dir = std::env::temp_dir().join(format!("sg-service-{}", std::process::id()));
    let id = "a".repeat(64);
    let c = dir.join("var/lib/docker/containers").join(&id);
    std::fs::create_dir_all(&c).unwrap();
    // Not JSON: the container keeps its id.
    std::fs::write(c.join("config.v2.json"), "{not json").unwrap();
    let mut r = ServiceResolver::new(&dir);
    let s = r.resolve(&format!("/docker/{id}"));
    assert_eq!(s.name, "aaaaaaaaaaaa");
    // Written later (the runtime is a moment behind the cgroup): found,
    // because a nameless container is not cached.
    std::fs::write(c.join("config.v2.json"), r#"{"Name":"/late"}"#).unwrap();
    assert_eq!(r.resolve(&format!("/docker/{id}")).name, "late");
    // Larger than METADATA_MAX: not parsed.
    let big = format!(
        r#"{{"Name":"/big","Pad":"{}"}}"#,
        "x".repeat(METADATA_MAX as usize)
    );
    let id2 = "b".repeat(64);
    let c2 = dir.join("var/lib/docker/containers").join(&id2);
    std::fs::create_dir_all(&c2).unwrap();
    std::fs::write(c2.join("config.v2.json"), big).unwrap();
    assert_eq!(r.resolve(&format!("/docker/{id2}")).name, "bbbbbbbbbbbb");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn cache_is_bounded() {
    let mut r = ServiceResolver::new(fixtures());
    for i in 0..CACHE_MAX + 10 {
        r.resolve(&format!("/system.slice/u{i}.service"));
    }
    assert!(r.len() <= CACHE_MAX, "{} cached", r.len());
    assert_eq!(r.evictions, 1);
}
