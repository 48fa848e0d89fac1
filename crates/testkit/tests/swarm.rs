//! The P2P swarm on loopback: an instrumented origin, a scheduler, one seed peer and several
//! peers, all real binaries.

use d7y_testkit::swarm::{bytes_by_parent, bytes_by_source, only_task_id, Sources};
use d7y_testkit::{Daemon, Swarm};
use rand::RngCore;
use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

const MIB: usize = 1024 * 1024;

/// Swarm tests start up to eight processes each: run them one at a time also under plain
/// `cargo test` (nextest already runs end-to-end tests serially).
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn random(len: usize) -> Vec<u8> {
    let mut data = vec![0u8; len];
    rand::thread_rng().fill_bytes(&mut data);
    data
}

fn wait_ok(children: Vec<Child>, swarm: &Swarm) {
    for (i, child) in children.into_iter().enumerate() {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "peer{i} dfget failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            swarm.logs()
        );
    }
}

fn same_file(path: &Path, data: &[u8]) -> bool {
    std::fs::read(path).map(|d| d == data).unwrap_or(false)
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn six_peers_share_one_origin_copy() {
    let _serial = serial();
    let swarm = Swarm::start(6, "");
    let size = 256 * MIB;
    let data = random(size);
    let url = swarm.origin.put("big.bin", data.clone());
    let started = Instant::now();
    let children = swarm.spawn_all(&url);
    wait_ok(children, &swarm);
    let elapsed = started.elapsed();
    for i in 0..6 {
        assert!(same_file(&swarm.output(i), &data), "peer{i} output differs");
    }
    let served = swarm.origin.bytes_served();
    assert!(
        served as f64 <= 1.05 * size as f64,
        "origin served {served} bytes for a {size}-byte file\n{}",
        swarm.logs()
    );
    let sources: Vec<Sources> = swarm.peers.iter().map(bytes_by_source).collect();
    eprintln!(
        "bytes from other peers: {:?}",
        sources
            .iter()
            .map(|s| s.peers / MIB as u64)
            .collect::<Vec<_>>()
    );
    for (i, s) in sources.iter().enumerate() {
        assert_eq!(s.total(), size as u64, "peer{i} holds every byte");
        assert!(
            s.peers * 2 >= size as u64,
            "peer{i} got only {} of {size} bytes from other peers\n{}",
            s.peers,
            swarm.logs()
        );
    }
    eprintln!("six peers, 256 MiB: {elapsed:?}, origin served {served} bytes");
}

#[test]
fn peers_finish_when_a_parent_dies() {
    let _serial = serial();
    // Slow peers so the kill lands mid-download.
    let mut swarm = Swarm::start(5, "  bandwidthLimit: 24MiB\n");
    let size = 64 * MIB;
    let data = random(size);
    let url = swarm.origin.put("kill.bin", data.clone());
    let mut children = swarm.spawn_all(&url);
    // Wait until peer0 holds pieces others can take, then kill it.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let has = std::fs::read_dir(swarm.peers[0].tasks_dir())
            .map(|mut d| d.next().is_some())
            .unwrap_or(false);
        if has {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "peer0 never started\n{}",
            swarm.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(1000));
    swarm.peers[0].kill();
    let killed = children.remove(0);
    drop(killed);
    let killed_at = Instant::now();
    for (i, child) in children.into_iter().enumerate() {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "peer{} failed: {}\n{}",
            i + 1,
            String::from_utf8_lossy(&out.stderr),
            swarm.logs()
        );
        assert!(
            same_file(&swarm.output(i + 1), &data),
            "peer{} output differs",
            i + 1
        );
    }
    // Pieces the seed dealt to the dead peer must not stay held back for the others until
    // the seed's relay grace (12 s) runs out: its slot ends with its stream.
    assert!(
        killed_at.elapsed() < Duration::from_secs(10),
        "the others took {:?} to finish after the kill\n{}",
        killed_at.elapsed(),
        swarm.logs()
    );
}

#[test]
fn a_corrupt_parent_is_detected_reported_and_not_used_again() {
    let _serial = serial();
    // Each peer on its own address: the scheduler excludes a parent for everyone only
    // when children on two addresses report it.
    let swarm = Swarm::start_on_own_addresses(4, "");
    let size = 32 * MIB;
    let data = random(size);
    let url = swarm.origin.put("corrupt.bin", data.clone());

    // peer0 downloads, then its disk "rots": every piece it serves is now wrong (its
    // recorded digests are still those of the right bytes).
    let out = swarm.peers[0].dfget_output(&url, &swarm.output(0), &[]);
    assert!(out.status.success(), "{}", swarm.logs());
    let task_id = only_task_id(&swarm.peers[0]);
    let content = swarm.peers[0].content_path(&task_id);
    let mut bytes = std::fs::read(&content).unwrap();
    for b in bytes.iter_mut().step_by(4096) {
        *b ^= 0xff;
    }
    std::fs::write(&content, &bytes).unwrap();

    // peer1 and peer2 prefer a normal peer over the seed, meet the corruption, recover,
    // and report it. One report only keeps the reporter away from peer0.
    let peer0_host = "127.0.0.10-peer0-";
    let mut witnesses = 0;
    for i in 1..=2 {
        let out = swarm.peers[i].dfget_output(&url, &swarm.output(i), &[]);
        assert!(out.status.success(), "{}", swarm.logs());
        assert!(
            same_file(&swarm.output(i), &data),
            "peer{i} output is corrupt"
        );
        if metric(
            &swarm.peers[i].metrics(),
            "dragonfly_dfdaemon_download_piece_failure_total",
        ) >= 1.0
        {
            witnesses += 1;
        }
        assert!(
            bytes_by_parent(&swarm.peers[i])
                .iter()
                .all(|(p, _)| !p.as_deref().unwrap_or("").starts_with(peer0_host)),
            "peer{i} kept a piece from the corrupt parent"
        );
        // Withdraw peer1's copy, so that peer2 too finds peer0 the only normal holder.
        delete_local_task(&swarm.peers[i], &task_id);
    }
    assert_eq!(
        witnesses,
        2,
        "peer1 and peer2 must both meet the corrupt parent (one report does not exclude it \
         for others), or the test proved nothing\n{}",
        swarm.logs()
    );
    let failures = metric(
        &swarm.scheduler.metrics(),
        "dragonfly_scheduler_download_piece_finished_failure_total",
    );
    assert!(
        failures >= 2.0,
        "the failures were not reported to the scheduler"
    );

    // Two addresses reported it: peer3 is never offered peer0.
    let out = swarm.peers[3].dfget_output(&url, &swarm.output(3), &[]);
    assert!(out.status.success(), "{}", swarm.logs());
    assert!(same_file(&swarm.output(3), &data));
    assert_eq!(
        metric(
            &swarm.peers[3].metrics(),
            "dragonfly_dfdaemon_download_piece_failure_total"
        ),
        0.0,
        "peer3 was handed the corrupt parent\n{}",
        swarm.logs()
    );
}

#[test]
fn peers_finish_when_the_scheduler_dies_and_register_when_it_returns() {
    let _serial = serial();
    let mut swarm = Swarm::start(3, "  bandwidthLimit: 24MiB\n");
    let size = 64 * MIB;
    let data = random(size);
    let url = swarm.origin.put("sched.bin", data.clone());
    let children = swarm.spawn_all(&url);
    std::thread::sleep(Duration::from_millis(800));
    swarm.scheduler.kill();
    wait_ok(children, &swarm);
    for i in 0..3 {
        assert!(same_file(&swarm.output(i), &data), "peer{i} output differs");
    }

    // The scheduler returns on the same port: the next download registers with it.
    swarm.scheduler.restart().unwrap();
    let again = random(8 * MIB);
    let url2 = swarm.origin.put("after.bin", again.clone());
    let out = swarm.peers[0].dfget_output(&url2, &swarm.dir.path().join("after"), &[]);
    assert!(out.status.success(), "{}", swarm.logs());
    assert!(same_file(&swarm.dir.path().join("after"), &again));
    let registered = metric(
        &swarm.scheduler.metrics(),
        "dragonfly_scheduler_register_peer_total",
    );
    assert!(
        registered >= 1.0,
        "no registration after the restart\n{}",
        swarm.logs()
    );
}

#[test]
fn an_unreachable_scheduler_means_back_to_source_or_a_clear_error() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let origin = d7y_testkit::Origin::start(d7y_testkit::OriginOptions::default());
    let dead = format!("127.0.0.1:{}", d7y_testkit::free_port());
    let peer = Daemon::start_opts(
        &dir.path().join("peer"),
        &d7y_testkit::DaemonOptions {
            hostname: Some("lonely".into()),
            schedulers: vec![dead],
            ..Default::default()
        },
    )
    .unwrap();
    let data = random(12 * MIB);
    let url = origin.put("alone.bin", data.clone());
    let out = dir.path().join("out");
    let result = peer.dfget_output(&url, &out, &[]);
    assert!(result.status.success(), "{}", peer.log());
    assert!(same_file(&out, &data));
    assert!(origin.bytes_served() <= data.len() as u64 + 16);

    let url = origin.put("never.bin", random(12 * MIB));
    let out = dir.path().join("never");
    let result = peer.dfget_output(&url, &out, &["--disable-back-to-source"]);
    assert!(!result.status.success());
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(stderr.contains("scheduler"), "unclear error: {stderr}");
    eprintln!("dfget said: {stderr}");
    assert!(!out.exists(), "nothing may be left at the output path");
}

#[test]
fn files_of_one_piece_bypass_the_scheduler() {
    let _serial = serial();
    let swarm = Swarm::start(1, "");
    let small = random(3 * MIB);
    let url = swarm.origin.put("small.bin", small.clone());
    let out = swarm.output(0);
    let result = swarm.peers[0].dfget_output(&url, &out, &[]);
    assert!(result.status.success(), "{}", swarm.logs());
    assert!(same_file(&out, &small));
    let registered = metric(
        &swarm.scheduler.metrics(),
        "dragonfly_scheduler_register_peer_total",
    );
    assert_eq!(
        registered, 0.0,
        "a one-piece file went through the scheduler"
    );

    // A larger one registers (the peer, then the seed peer it triggers).
    let big = random(5 * MIB);
    let url = swarm.origin.put("big.bin", big.clone());
    let out = swarm.dir.path().join("big");
    let result = swarm.peers[0].dfget_output(&url, &out, &[]);
    assert!(result.status.success(), "{}", swarm.logs());
    assert!(same_file(&out, &big));
    let registered = metric(
        &swarm.scheduler.metrics(),
        "dragonfly_scheduler_register_peer_total",
    );
    assert!(
        registered >= 2.0,
        "expected the peer and the seed to register, got {registered}"
    );
}

/// The scheduler's count of peers in a task (StatTask).
fn scheduler_peer_count(swarm: &Swarm, task_id: &str) -> u32 {
    use dragonfly_api::scheduler::v2::scheduler_client::SchedulerClient;
    use dragonfly_api::scheduler::v2::StatTaskRequest;
    let addr = format!("http://{}", swarm.scheduler.addr());
    let task_id = task_id.to_string();
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(async move {
            SchedulerClient::connect(addr)
                .await
                .unwrap()
                .stat_task(StatTaskRequest {
                    task_id,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
                .peer_count
        })
}

/// Deletes a task on a daemon over its unix socket, as dfcache or a tool would.
fn delete_local_task(daemon: &Daemon, task_id: &str) {
    use dragonfly_api::dfdaemon::v2::DeleteTaskRequest;
    let task_id = task_id.to_string();
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(async move {
            daemon
                .download_client()
                .await
                .unwrap()
                .delete_task(DeleteTaskRequest {
                    task_id,
                    remote_ip: None,
                })
                .await
                .unwrap();
        });
}

#[test]
fn a_deleted_task_is_withdrawn_from_the_scheduler() {
    let _serial = serial();
    let swarm = Swarm::start(1, "");
    let data = random(8 * MIB);
    let url = swarm.origin.put("withdrawn.bin", data.clone());
    let out = swarm.peers[0].dfget_output(&url, &swarm.output(0), &[]);
    assert!(out.status.success(), "{}", swarm.logs());
    let task_id = only_task_id(&swarm.peers[0]);
    // The peer and the seed peer it triggered.
    assert_eq!(
        scheduler_peer_count(&swarm, &task_id),
        2,
        "{}",
        swarm.logs()
    );

    delete_local_task(&swarm.peers[0], &task_id);
    assert_eq!(
        scheduler_peer_count(&swarm, &task_id),
        1,
        "the scheduler still offers the peer that deleted the task\n{}",
        swarm.logs()
    );
}

#[test]
fn a_task_garbage_collected_is_withdrawn_from_the_scheduler() {
    let _serial = serial();
    let swarm = Swarm::start_with(1, "", "gc:\n  interval: 1s\n  policy:\n    taskTTL: 2s\n");
    let data = random(8 * MIB);
    let url = swarm.origin.put("collected.bin", data.clone());
    let out = swarm.peers[0].dfget_output(&url, &swarm.output(0), &[]);
    assert!(out.status.success(), "{}", swarm.logs());
    assert!(same_file(&swarm.output(0), &data));
    let task_id = only_task_id(&swarm.peers[0]);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let gone = !swarm.peers[0].content_path(&task_id).exists();
        if gone && scheduler_peer_count(&swarm, &task_id) == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "after GC (content gone: {gone}) the scheduler still lists the peer\n{}",
            swarm.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_parent_lying_about_its_crcs_is_caught_by_the_seed_peers_digests() {
    let _serial = serial();
    let mut swarm = Swarm::start_on_own_addresses(2, "");
    let size = 32 * MIB;
    let data = random(size);
    let url = swarm.origin.put("liar.bin", data.clone());
    let out = swarm.peers[0].dfget_output(&url, &swarm.output(0), &[]);
    assert!(out.status.success(), "{}", swarm.logs());
    let task_id = only_task_id(&swarm.peers[0]);

    // peer0 turns liar: it serves other bytes, with CRCs that match them, so a child that
    // checks only what its parent claims takes them.
    swarm.peers[0].kill();
    let content = swarm.peers[0].content_path(&task_id);
    let mut bytes = std::fs::read(&content).unwrap();
    for b in bytes.iter_mut().step_by(4096) {
        *b ^= 0x5a;
    }
    std::fs::write(&content, &bytes).unwrap();
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let storage = d7y_storage::Storage::open(&swarm.peers[0].data_dir(), true).unwrap();
        for mut piece in storage.pieces(&task_id).await.unwrap() {
            let range = piece.offset as usize..(piece.offset + piece.length) as usize;
            piece.digest = format!("crc32:{}", crc32fast::hash(&bytes[range]));
            storage.put_piece(&task_id, piece).await.unwrap();
        }
    });
    swarm.peers[0].restart().unwrap();

    // peer1 prefers the normal peer, is told the seed's digests with its parents, refuses
    // every piece peer0 offers, and ends with the right bytes from the seed.
    let out = swarm.peers[1].dfget_output(&url, &swarm.output(1), &[]);
    assert!(out.status.success(), "{}", swarm.logs());
    assert!(
        same_file(&swarm.output(1), &data),
        "peer1 took the liar's bytes\n{}",
        swarm.logs()
    );
    assert!(
        metric(
            &swarm.peers[1].metrics(),
            "dragonfly_dfdaemon_download_piece_failure_total"
        ) >= 1.0,
        "peer1 never tried the liar, so the test proved nothing\n{}",
        swarm.logs()
    );
    assert!(
        bytes_by_parent(&swarm.peers[1])
            .iter()
            .all(|(p, _)| !p.as_deref().unwrap_or("").starts_with("127.0.0.10-peer0-")),
        "peer1 kept a piece from the liar"
    );
    assert!(
        swarm.peers[1].log().contains("the seed peer's"),
        "the refusal does not name the seed's digest\n{}",
        swarm.logs()
    );
}

#[test]
fn a_parent_that_stops_answering_is_replaced() {
    let _serial = serial();
    let swarm = Swarm::start_on_own_addresses(2, "");
    let size = 24 * MIB;
    let data = random(size);
    let url = swarm.origin.put("frozen.bin", data.clone());
    let out = swarm.peers[0].dfget_output(&url, &swarm.output(0), &[]);
    assert!(out.status.success(), "{}", swarm.logs());
    // The seed peer's copy goes, so peer0 is the only holder; then peer0 freezes (its
    // connections stay open, nothing answers), as a host that hangs.
    let task_id = only_task_id(&swarm.peers[0]);
    delete_local_task(&swarm.seed, &task_id);
    swarm.peers[0].signal("-STOP");
    let started = Instant::now();
    let out = swarm.peers[1].dfget_output(&url, &swarm.output(1), &[]);
    let took = started.elapsed();
    swarm.peers[0].signal("-CONT");
    assert!(out.status.success(), "{}", swarm.logs());
    assert!(same_file(&swarm.output(1), &data));
    assert!(
        took < Duration::from_secs(45),
        "took {took:?} to get past a frozen parent\n{}",
        swarm.logs()
    );
    assert!(
        swarm.peers[1].log().contains("no piece from the parents"),
        "peer1 never waited on the frozen parent, so the test proved nothing\n{}",
        swarm.logs()
    );
}

#[test]
fn the_endgame_takes_the_last_pieces_from_a_faster_parent() {
    let _serial = serial();
    // peer0 uploads at 1 MiB/s, peer1 as fast as loopback goes.
    let swarm = Swarm::start_custom(3, |i| d7y_testkit::DaemonOptions {
        upload_yaml: if i == 0 {
            "  bandwidthLimit: 1048576\n".into()
        } else {
            String::new()
        },
        ip: Some(format!("127.0.0.{}", 10 + i)),
        ..Default::default()
    });
    let size = 32 * MIB;
    let data = random(size);
    let url = swarm.origin.put("endgame.bin", data.clone());
    for i in 0..2 {
        let out = swarm.peers[i].dfget_output(&url, &swarm.output(i), &[]);
        assert!(out.status.success(), "{}", swarm.logs());
    }
    // Only peer0 and peer1 hold it now: peer2 takes pieces from both, and the ones it
    // started at the slow peer0 are the last in flight.
    let task_id = only_task_id(&swarm.peers[0]);
    delete_local_task(&swarm.seed, &task_id);
    let started = Instant::now();
    let out = swarm.peers[2].dfget_output(&url, &swarm.output(2), &[]);
    let took = started.elapsed();
    assert!(out.status.success(), "{}", swarm.logs());
    assert!(same_file(&swarm.output(2), &data), "{}", swarm.logs());
    let log = swarm.peers[2].log();
    assert!(
        log.contains("endgame: a second copy won; the writing fetch takes the rest from it"),
        "no endgame copy won, so the test proved nothing\n{}",
        swarm.logs()
    );
    // Without the endgame, the pieces at peer0 alone would take 4 s each.
    assert!(
        took < Duration::from_secs(6),
        "took {took:?}\n{}",
        swarm.logs()
    );
    // Every piece is recorded once, and the file holds exactly the recorded copies.
    let by_parent = bytes_by_parent(&swarm.peers[2]);
    assert_eq!(
        by_parent.iter().map(|(_, b)| b).sum::<u64>(),
        size as u64,
        "{by_parent:?}"
    );
}
