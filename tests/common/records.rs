//! The guest workload the snapshot and migration tests share: a counter, numbered records
//! flushed to the disks, a TCP stream, and the checks that none of it was lost or doubled.

use std::io::Read;
use std::net::TcpListener;
use std::path::Path;
use std::time::Duration;

use super::net::HostTap;
use super::CMDLINE;

/// Record size on the disk (one per sector, `rec NNNNNNNN` then padding).
pub const SECTOR: u64 = 512;

/// The guest's workload, one `eval` word: `extra` first, then record i written to sector i
/// of /dev/vda (and of the IDE disk /dev/sda when there is one) with O_DIRECT and fsync,
/// then `ack=i` on the console; `count=i` lines between.
pub fn workload(extra: &str) -> String {
    format!(
        "{CMDLINE} -- eval \"{extra} i=0; while true; do echo count=\\$i; \
         printf 'rec %08d' \\$i | dd of=/dev/vda bs=512 seek=\\$i conv=sync,fsync oflag=direct 2>/dev/null \
         && {{ [ ! -b /dev/sda ] || printf 'rec %08d' \\$i | dd of=/dev/sda bs=512 seek=\\$i conv=sync,fsync oflag=direct 2>/dev/null; }} \
         && echo ack=\\$i; i=\\$((i+1)); sleep 0.05; done\""
    )
}

/// The numbers after `key=` in `text`, in order (a line cut by a snapshot or a switch-over
/// may hold two).
pub fn numbers(text: &str, key: &str) -> Vec<u64> {
    let pat = format!("{key}=");
    text.match_indices(&pat)
        .filter_map(|(i, _)| {
            let rest = &text[i + pat.len()..];
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            digits.parse().ok()
        })
        .collect()
}

/// `seq` must run 0, 1, 2, ... with no gap and no repeat.
pub fn assert_consecutive(seq: &[u64], what: &str, dump: &str) {
    assert!(!seq.is_empty(), "no {what} at all\n{dump}");
    for w in seq.windows(2) {
        assert_eq!(
            w[1],
            w[0] + 1,
            "{what}: {} followed by {}\n{dump}",
            w[0],
            w[1]
        );
    }
    assert_eq!(seq[0], 0, "{what} starts at 0\n{dump}");
}

/// Every record up to `last` is in the image, intact.
pub fn assert_records(img: &Path, last: u64) {
    let data = std::fs::read(img).unwrap();
    for i in 0..=last {
        let off = (i * SECTOR) as usize;
        let want = format!("rec {i:08}");
        assert_eq!(
            &data[off..off + want.len()],
            want.as_bytes(),
            "record {i} of {last} acknowledged records"
        );
    }
}

/// The stdout of a client command that must have succeeded.
pub fn ok(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "{:?}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The host end of a TCP stream of `n` numbered lines the guest sends slowly: what it got.
pub fn stream_receiver(tap: &HostTap, port: u16) -> std::thread::JoinHandle<String> {
    let listener = TcpListener::bind((tap.host_ip(), port)).unwrap();
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(600))).unwrap();
        let mut got = String::new();
        // A timeout leaves what came so far, for the assertion to show.
        let _ = s.read_to_string(&mut got);
        got
    })
}

/// The guest commands that send the stream: 3000 numbered lines, 50 every 0.2 s, then
/// `stream-done-42` on the console.
pub fn guest_stream(tap: &HostTap, port: u16) -> String {
    format!(
        "{} && (for j in \\$(seq 1 3000); do echo line-\\$j; [ \\$((j % 50)) = 0 ] && sleep 0.2; done | nc {} {port}; echo stream-done-\\$((6*7))) &",
        tap.guest_setup("eth0"),
        tap.host_ip()
    )
}

/// The stream arrived whole and in order.
pub fn assert_stream(got: &str) {
    let lines: Vec<u64> = got
        .lines()
        .map(|l| l.strip_prefix("line-").unwrap().parse().unwrap())
        .collect();
    assert_eq!(lines.len(), 3000, "the whole stream arrived");
    for (k, n) in lines.iter().enumerate() {
        assert_eq!(*n, k as u64 + 1, "TCP stream line {k}");
    }
}
