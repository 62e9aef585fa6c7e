//! Criterion benches of the placement core: one decision (acquire, then release) with 10,
//! 1,000 and 10,000 hosts, under nixdispatch's policy and two alternatives.

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use nixdispatch_benches::corebench::CoreBench;
use nixdispatch_scheduler::core::PolicyKind;

fn decisions(c: &mut Criterion) {
    let mut g = c.benchmark_group("acquire_release");
    for hosts in [10usize, 1_000, 10_000] {
        for policy in [
            PolicyKind::LeastLoaded,
            PolicyKind::PowerOfTwo,
            PolicyKind::FirstFit,
        ] {
            let mut b = CoreBench::new(hosts, policy);
            g.bench_with_input(
                BenchmarkId::new(policy.as_str(), hosts),
                &hosts,
                |bch, _| bch.iter(|| b.decide()),
            );
        }
    }
    g.finish();
}

criterion_group!(benches, decisions);
criterion_main!(benches);
