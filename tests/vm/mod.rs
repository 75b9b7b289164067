//! QEMU harness: assets (installed by tests/vm/setup.sh), initramfs and
//! root filesystem images, and a booted VM reachable over hybrid vsock.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Port envd listens on inside the guest.
pub const PORT: u32 = 49983;

/// The vsock kernel modules, then the socket diagnostics the ports scan
/// asks (`inet_diag`, `tcp_diag`), in load order (no modprobe in the
/// initramfs).
pub const MODULES: [&str; 10] = [
    "drivers/virtio/virtio_ring",
    "drivers/virtio/virtio",
    "drivers/virtio/virtio_pci_modern_dev",
    "drivers/virtio/virtio_pci_legacy_dev",
    "drivers/virtio/virtio_pci",
    "net/vmw_vsock/vsock",
    "net/vmw_vsock/vmw_vsock_virtio_transport_common",
    "net/vmw_vsock/vmw_vsock_virtio_transport",
    "net/ipv4/inet_diag",
    "net/ipv4/tcp_diag",
];

pub struct Assets {
    pub root: PathBuf,
    pub kernel: PathBuf,
    pub modules: PathBuf,
    pub vdv: PathBuf,
    pub envd: PathBuf,
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Everything a VM test needs, or why it cannot run here.
pub fn assets() -> Result<Assets, String> {
    let cache = root().join(".cache/qemu");
    let kernel = std::fs::read_dir(cache.join("kernel/boot"))
        .map_err(|_| "no guest kernel (run tests/vm/setup.sh; make qemu-test does)".to_owned())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz"))
        })
        .ok_or("no vmlinuz in .cache/qemu/kernel/boot")?;
    let modules = std::fs::read_dir(cache.join("kernel/lib/modules"))
        .map_err(|e| e.to_string())?
        .filter_map(|e| e.ok().map(|e| e.path().join("kernel")))
        .next()
        .ok_or("no kernel modules")?;
    let vdv = cache.join("tools/bin/vhost-device-vsock");
    if !vdv.exists() {
        return Err("vhost-device-vsock not installed (run tests/vm/setup.sh)".into());
    }
    if Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_err()
    {
        return Err("qemu-system-x86_64 not installed (run tests/vm/setup.sh)".into());
    }
    if !Path::new("/bin/busybox").exists() {
        return Err("busybox-static not installed".into());
    }
    // Set by `make qemu-test` after `make static`, so plain `cargo test`
    // never boots VMs with a stale binary.
    let envd = std::env::var_os("ENVD_STATIC")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .ok_or("ENVD_STATIC is not set (make qemu-test runs these tests)")?;
    if !envd.exists() {
        return Err(format!(
            "no static envd at {} (make static)",
            envd.display()
        ));
    }
    Ok(Assets {
        root: root(),
        kernel,
        modules,
        vdv,
        envd,
    })
}

fn sh(script: &str) {
    let st = Command::new("sh").arg("-c").arg(script).status().unwrap();
    assert!(st.success(), "failed: {script}");
}

/// A busybox tree with the vsock modules; `init` is installed as /init.
pub fn initramfs(a: &Assets, dir: &Path, init: &Path, extra_modules: &[&str]) -> PathBuf {
    let r = dir.join("initramfs");
    for d in [
        "bin",
        "sbin",
        "etc",
        "root",
        "proc",
        "sys",
        "dev",
        "tmp",
        "run",
        "lib/modules",
        "newroot",
    ] {
        std::fs::create_dir_all(r.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", r.join("bin/busybox")).unwrap();
    let list = Command::new("/bin/busybox").arg("--list").output().unwrap();
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        let _ = std::os::unix::fs::symlink("busybox", r.join("bin").join(applet));
    }
    for m in MODULES.iter().chain(extra_modules) {
        let src = a.modules.join(format!("{m}.ko"));
        let name = Path::new(m)
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        std::fs::copy(&src, r.join(format!("lib/modules/{name}.ko")))
            .unwrap_or_else(|e| panic!("{}: {e}", src.display()));
    }
    std::fs::write(r.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
    std::fs::write(r.join("etc/group"), "root:x:0:\n").unwrap();
    std::fs::copy(init, r.join("init")).unwrap();
    sh(&format!("chmod 755 {0}/init && cd {0} && find . -print0 | cpio --null -o -H newc --quiet | gzip -1 > {1}/initramfs.cpio.gz", r.display(), dir.display()));
    dir.join("initramfs.cpio.gz")
}

/// `envd.modules=` for the modules in the initramfs.
pub fn modules_arg() -> String {
    let list: Vec<String> = MODULES
        .iter()
        .map(|m| {
            format!(
                "/lib/modules/{}.ko",
                Path::new(m).file_name().unwrap().to_string_lossy()
            )
        })
        .collect();
    format!("envd.modules={}", list.join(","))
}

/// A VM's memory, vCPUs (under TCG, one host thread each) and `-nic`.
#[derive(Clone, Copy)]
pub struct Shape<'a> {
    pub mem_mb: u32,
    pub cpus: u32,
    pub nic: &'a str,
}

pub struct Vm {
    pub dir: PathBuf,
    pub qemu: Child,
    vdv: Child,
    pub started: Instant,
}

/// A free loopback TCP port on the host (for a QEMU host forward).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Vm {
    /// Boots a VM: vhost-device-vsock first (it is the vhost-user server),
    /// then QEMU under TCG with the shared memory backend vhost-user needs.
    pub fn boot(
        a: &Assets,
        dir: &Path,
        initrd: &Path,
        append: &str,
        disk: Option<&Path>,
        mem_mb: u32,
    ) -> Vm {
        Self::boot_with_nic(a, dir, initrd, append, disk, mem_mb, "none")
    }

    /// [`Vm::boot`] with a QEMU `-nic` option, e.g. user-mode networking
    /// with host forwards: `user,model=virtio-net-pci,hostfwd=...`.
    pub fn boot_with_nic(
        a: &Assets,
        dir: &Path,
        initrd: &Path,
        append: &str,
        disk: Option<&Path>,
        mem_mb: u32,
        nic: &str,
    ) -> Vm {
        let shape = Shape {
            mem_mb,
            cpus: 1,
            nic,
        };
        Self::boot_shaped(a, dir, initrd, append, disk, &shape)
    }

    /// Boots a VM of the given [`Shape`].
    pub fn boot_shaped(
        a: &Assets,
        dir: &Path,
        initrd: &Path,
        append: &str,
        disk: Option<&Path>,
        shape: &Shape,
    ) -> Vm {
        let Shape { mem_mb, cpus, nic } = *shape;
        let vdv = Command::new(&a.vdv)
            .arg("--vm")
            .arg(format!(
                "guest-cid=3,socket={0}/vhost.sock,uds-path={0}/vsock.sock",
                dir.display()
            ))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("vdv.log")).unwrap())
            .spawn()
            .unwrap();
        let t = Instant::now();
        while !dir.join("vhost.sock").exists() {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "vhost-device-vsock did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let started = Instant::now();
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args([
            "-accel",
            "tcg",
            "-m",
            &format!("{mem_mb}M"),
            "-nodefaults",
            "-no-user-config",
            "-smp",
            &cpus.to_string(),
            "-nic",
            nic,
        ])
        .args(["-display", "none", "-no-reboot"])
        .arg("-serial")
        .arg(format!("file:{}/console.log", dir.display()))
        .arg("-kernel")
        .arg(&a.kernel)
        .arg("-initrd")
        .arg(initrd)
        .arg("-append")
        .arg(format!("console=ttyS0 panic=-1 quiet {append}"))
        .arg("-object")
        .arg(format!(
            "memory-backend-memfd,id=mem,size={mem_mb}M,share=on"
        ))
        .args(["-machine", "memory-backend=mem"])
        .arg("-chardev")
        .arg(format!(
            "socket,id=vsock0,path={}/vhost.sock",
            dir.display()
        ))
        .args(["-device", "vhost-user-vsock-pci,chardev=vsock0"]);
        if let Some(disk) = disk {
            cmd.arg("-drive").arg(format!(
                "file={},format=raw,if=virtio,cache=unsafe",
                disk.display()
            ));
        }
        let qemu = cmd
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("qemu.log")).unwrap())
            .spawn()
            .unwrap();
        Vm {
            dir: dir.to_path_buf(),
            qemu,
            vdv,
            started,
        }
    }

    pub fn url(&self) -> String {
        format!("hvsock://{}/vsock.sock:{PORT}", self.dir.display())
    }

    pub fn console(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(self.dir.join("console.log")).unwrap_or_default())
            .into_owned()
    }

    /// Waits for QEMU to exit (the guest powered off).
    pub fn wait_exit(&mut self, timeout: Duration) -> bool {
        let t = Instant::now();
        while t.elapsed() < timeout {
            if let Ok(Some(_)) = self.qemu.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        // QEMU first: vhost-device-vsock does not exit when QEMU goes away.
        let _ = self.qemu.kill();
        let _ = self.qemu.wait();
        let _ = self.vdv.kill();
        let _ = self.vdv.wait();
    }
}

/// The cached minimal Debian (systemd) tree, if tests/vm/setup.sh made it.
pub fn debian_rootfs() -> Option<PathBuf> {
    let r = root().join(".cache/qemu/rootfs");
    r.join("sbin/init").exists().then_some(r)
}

/// An ext4 image of the Debian tree with envd installed as a systemd
/// service (the repository's unit), vsock loaded by modules-load.d.
pub fn systemd_image(a: &Assets, rootfs: &Path, dir: &Path) -> PathBuf {
    systemd_image_with(a, rootfs, dir, &[])
}

/// [`systemd_image`] plus `files` (path in the guest, content), e.g. a
/// drop-in for the unit or a systemd-networkd configuration.
pub fn systemd_image_with(
    a: &Assets,
    rootfs: &Path,
    dir: &Path,
    files: &[(&str, &str)],
) -> PathBuf {
    let tree = dir.join("rootfs");
    sh(&format!("cp -a {} {}", rootfs.display(), tree.display()));
    let kver = a.modules.parent().unwrap();
    let ver = kver.file_name().unwrap().to_string_lossy().into_owned();
    sh(&format!(
        "mkdir -p {0}/lib/modules && cp -a {1} {0}/lib/modules/ && chroot {0} depmod {2}",
        tree.display(),
        kver.display(),
        ver
    ));
    std::fs::create_dir_all(tree.join("etc/modules-load.d")).unwrap();
    std::fs::write(
        tree.join("etc/modules-load.d/vsock.conf"),
        "vmw_vsock_virtio_transport\n",
    )
    .unwrap();
    std::fs::copy(&a.envd, tree.join("usr/bin/envd")).unwrap();
    std::fs::copy(
        a.root.join("systemd/envd.service"),
        tree.join("etc/systemd/system/envd.service"),
    )
    .unwrap();
    std::fs::create_dir_all(tree.join("etc/systemd/system/sysinit.target.wants")).unwrap();
    let _ = std::os::unix::fs::symlink(
        "/etc/systemd/system/envd.service",
        tree.join("etc/systemd/system/sysinit.target.wants/envd.service"),
    );
    std::fs::write(tree.join("etc/fstab"), "/dev/vda / ext4 rw,noatime 0 1\n").unwrap();
    for (path, content) in files {
        let p = tree.join(path.trim_start_matches('/'));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        if let Some(target) = content.strip_prefix("symlink:") {
            let _ = std::fs::remove_file(&p);
            std::os::unix::fs::symlink(target, &p).unwrap();
        } else {
            std::fs::write(&p, content).unwrap();
        }
    }
    let img = dir.join("rootfs.img");
    sh(&format!(
        "mkfs.ext4 -q -F -L root -d {} {} 1G",
        tree.display(),
        img.display()
    ));
    sh(&format!("rm -rf {}", tree.display()));
    img
}

/// A busybox initramfs that mounts /dev/vda and switch_roots into systemd.
pub fn switch_root_initramfs(a: &Assets, dir: &Path) -> PathBuf {
    let script = dir.join("init.sh");
    std::fs::write(
        &script,
        "#!/bin/sh\n\
         mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev\n\
         for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk; do\n\
           insmod /lib/modules/$m.ko\n\
         done\n\
         for i in $(seq 100); do [ -b /dev/vda ] && break; sleep 0.05; done\n\
         mount -t ext4 /dev/vda /newroot\n\
         mount --move /dev /newroot/dev; umount /proc /sys\n\
         exec switch_root /newroot /sbin/init\n",
    )
    .unwrap();
    initramfs(a, dir, &script, &["drivers/block/virtio_blk"])
}
