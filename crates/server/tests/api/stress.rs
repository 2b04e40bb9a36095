//! The concurrency stress suite: 200 users with 1–3 connections each, runs started at
//! once, with seeded chaos (disconnect and resume, stop mid-run, invented thread ids,
//! other users' real run ids). Zero tolerance: one foreign frame, one lost or duplicated
//! event, one wrong number fails it. The seed is printed, and can be set with
//! `APEX_STRESS_SEED` to replay an interleaving.

use std::time::Duration;

use apex_loadgen::LoadConfig;

use crate::helpers::spawn_app_with;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_users_with_chaos_see_only_their_own_complete_streams() {
    let seed = std::env::var("APEX_STRESS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand_seed);
    println!("stress seed {seed} (set APEX_STRESS_SEED={seed} to replay)");
    let app = spawn_app_with(|s| s.template_stream_delay = Duration::from_millis(2)).await;
    let report = apex_loadgen::run(LoadConfig {
        base_url: app.address.clone(),
        users: 200,
        max_connections_per_user: 3,
        runs_per_user: 2,
        seed,
        chaos: true,
        max_duration: Duration::from_secs(600),
        ..LoadConfig::default()
    })
    .await
    .expect("load ran");
    println!("{}", report.render());
    assert!(
        report.is_clean(),
        "seed {seed}: {} violations, first ones:\n{}",
        report.violations.len(),
        report
            .violations
            .iter()
            .take(10)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(report.runs_started, 400, "seed {seed}");
    assert!(report.probes > 0, "chaos probes ran");
    assert!(report.runs_cancelled > 0, "some runs were stopped mid-way");
    assert!(
        report.runs_regenerated > 0,
        "steering (regenerate) was mixed in"
    );
    assert!(
        report.runs_double_texted > 0,
        "steering (double-texting) was mixed in"
    );
    assert!(
        report.runs_approved > 0,
        "steering (approval of the plan) was mixed in"
    );

    // Everything a connection held is gone once the users left.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while app.state.infra.bus.subscribed_users() + app.state.limits.users_with_connections() > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "connections left state behind"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn rand_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(7)
}
