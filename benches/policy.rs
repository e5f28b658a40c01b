//! Criterion bench `policy`: one name-stage decision with 10, 1,000 and 100,000 allow entries
//! for exact, suffix, glob and CIDR hits and a miss; plus compiling 100,000 entries and a
//! 600-rule pushed snapshot.
//! Goal (`policy.md` §6): under 1 µs for exact/suffix hits and misses, flat across sizes.

use std::hint::black_box;
use std::net::SocketAddr;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use portcullis::decision::Protocol;
use portcullis::policy::{
    CompiledPolicy, Host, NameStage, PolicySpec, RequestContext, normalize_host,
};

/// `n` entries: 45% exact names, 45% suffixes, up to 10% globs (≤ 10 000), and CIDRs.
fn entries(n: usize) -> Vec<String> {
    let mut v = Vec::with_capacity(n + 4);
    for i in 0..n {
        v.push(match i % 20 {
            0..=8 => format!("host{i}.example{}.com", i % 97),
            9..=17 => format!("*.zone{i}.example{}.org", i % 89),
            18 if i / 20 < 10_000 => format!("api-{i}*.glob{}.net", i % 50),
            _ => format!(
                "{}.{}.{}.0/24",
                20 + (i >> 16) % 200,
                (i >> 8) % 256,
                i % 256
            ),
        });
    }
    // The targets the bench looks up, present at every size.
    v.push("exact-target.example.com".into());
    v.push("**.suffix-target.example.org".into());
    v.push("region*.v2.glob-target.net".into());
    v.push("8.8.0.0/16".into());
    v
}

fn policy(n: usize) -> CompiledPolicy {
    let spec = PolicySpec {
        enabled: true,
        allowed: entries(n),
        denied: vec!["blocked.example.com".into()],
        ..PolicySpec::default()
    };
    CompiledPolicy::compile(&spec).expect("bench entries are valid")
}

fn decide(p: &CompiledPolicy, host: &Host, own: &[SocketAddr]) -> bool {
    let ctx = RequestContext {
        protocol: Protocol::HttpsConnect,
        host,
        port: 443,
        method: Some("CONNECT"),
        upgrade: false,
        own_addrs: own,
    };
    matches!(p.check_name(&ctx), NameStage::Proceed(_))
}

fn bench(c: &mut Criterion) {
    let cases = [
        ("exact_hit", "exact-target.example.com", true),
        ("suffix_hit", "a.b.suffix-target.example.org", true),
        ("glob_hit", "region7.v2.glob-target.net", true),
        ("cidr_hit", "8.8.4.4", true),
        ("miss", "nothing.here.example.net", false),
    ];
    let own: [SocketAddr; 0] = [];
    let mut group = c.benchmark_group("policy");
    for n in [10usize, 1_000, 100_000] {
        let p = policy(n);
        for (name, host, allowed) in cases {
            let host = normalize_host(host).expect("valid bench host");
            assert_eq!(decide(&p, &host, &own), allowed, "{name} at {n}");
            group.bench_with_input(BenchmarkId::new(name, n), &host, |b, h| {
                b.iter(|| decide(black_box(&p), black_box(h), &own))
            });
        }
    }
    group.finish();
    let mut compile = c.benchmark_group("compile");
    compile.sample_size(10);
    let spec = PolicySpec {
        enabled: true,
        allowed: entries(100_000),
        ..PolicySpec::default()
    };
    compile.bench_function("100000_entries", |b| {
        b.iter(|| CompiledPolicy::compile(black_box(&spec)).map(|_| ()))
    });
    // What a data plane does per pushed snapshot (control.md §8.5): 600 exact rules, as the
    // push-to-enforce example has after its 100-client rounds.
    let snap = portcullis::proto::v1::PolicySnapshot {
        allowed_domains: (0..600).map(|k| format!("c100-{k}.bench")).collect(),
        ..Default::default()
    };
    compile.bench_function("snapshot_600_exact", |b| {
        b.iter(|| {
            let spec = portcullis::proto::SnapshotLists::policy_spec(black_box(&snap), true, false)
                .map_err(|_| ());
            spec.and_then(|s| CompiledPolicy::compile(&s).map(|_| ()).map_err(|_| ()))
        })
    });
    compile.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
