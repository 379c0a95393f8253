#![allow(clippy::unwrap_used)]
use super::*;
use crate::EdgeStats;
use bulkhead_policy::Protocol;
use bulkhead_spiffe::SpiffeId;

/// 2024-05-01 10:00:00 UTC.
const T0: u64 = 1_714_557_600;

fn wl(name: &str) -> WorkloadRef {
    WorkloadRef {
        namespace: "shop".into(),
        name: name.into(),
    }
}

fn id(name: &str) -> SpiffeId {
    format!("spiffe://td.test/ns/shop/sa/{name}")
        .parse()
        .unwrap()
}

/// `count` requests from `from` to `to`:8080, with `verdict`, decided at ingress.
fn edge(from: &str, to: &str, verdict: EdgeVerdict, count: u64) -> Edge {
    Edge {
        key: EdgeKey {
            source_identity: Some(id(from)),
            source_workload: Some(wl(from)),
            destination: wl(to),
            port: 8080,
            protocol: Protocol::Http,
            method: Some("GET".into()),
            path: Some("/orders/*".into()),
            verdict,
            policy: Some("shop/orders-allow".into()),
            rule: Some("frontend".into()),
            direction: Direction::Ingress,
        },
        stats: EdgeStats {
            count,
            ..EdgeStats::one(T0, 1, 1, 1)
        },
    }
}

fn allowed(from: &str, to: &str) -> Edge {
    edge(from, to, EdgeVerdict::Allow, 1)
}

fn denied(from: &str, to: &str, count: u64) -> Edge {
    edge(from, to, EdgeVerdict::Deny, count)
}

fn detector() -> Detector {
    Detector::new(0, SpikeRule::default(), None)
}

fn kinds(o: &Observation) -> Vec<EventKind> {
    o.events.iter().map(|e| e.kind).collect()
}

#[test]
fn a_new_caller_is_one_new_identity_and_one_new_edge() {
    let mut d = detector();
    let o = d.observe(&[allowed("frontend", "orders")], T0);
    assert_eq!(kinds(&o), vec![EventKind::NewIdentity, EventKind::NewEdge]);
    let edge = &o.events[1];
    assert_eq!(
        edge.source_identity.as_deref(),
        Some(id("frontend").as_str())
    );
    assert_eq!(edge.destination, Some(wl("orders")));
    assert_eq!((edge.port, edge.requests, edge.denied), (Some(8080), 1, 0));
    assert_eq!(
        edge.detail,
        "first seen: 1 request allowed; for example GET /orders/* allowed by shop/orders-allow (rule frontend) at the destination's sidecar"
    );
    assert_eq!(
        o.events[0].detail,
        "first seen calling (workload shop/frontend): 1 request allowed"
    );
}

#[test]
fn the_same_edge_twice_is_one_event() {
    let mut d = detector();
    // Twice in one report (another method, the caller's sidecar's view) and again later.
    let mut post = allowed("frontend", "orders");
    post.key.method = Some("POST".into());
    post.key.direction = Direction::Egress;
    let o = d.observe(&[allowed("frontend", "orders"), post], T0);
    assert_eq!(kinds(&o), vec![EventKind::NewIdentity, EventKind::NewEdge]);
    assert_eq!(o.events[1].requests, 2);
    let again = d.observe(&[allowed("frontend", "orders")], T0 + 10);
    assert_eq!(again, Observation::default());

    // Another port or destination is a new edge, not a new identity.
    let mut other_port = allowed("frontend", "orders");
    other_port.key.port = 9090;
    let o = d.observe(&[other_port, allowed("frontend", "cart")], T0 + 20);
    assert_eq!(kinds(&o), vec![EventKind::NewEdge, EventKind::NewEdge]);
}

#[test]
fn callers_without_identity_are_named_by_workload_or_unauthenticated() {
    let mut d = detector();
    let mut by_workload = allowed("frontend", "orders");
    by_workload.key.source_identity = None;
    let mut nobody = by_workload.clone();
    nobody.key.source_workload = None;
    nobody.key.method = None;
    nobody.key.path = None;
    nobody.key.protocol = Protocol::Tcp;
    nobody.key.verdict = EdgeVerdict::Deny;
    assert_eq!(Caller::of(&by_workload.key).to_string(), "shop/frontend");
    assert_eq!(Caller::of(&nobody.key).to_string(), "unauthenticated");
    let o = d.observe(&[by_workload, nobody.clone()], T0);
    assert_eq!(kinds(&o), vec![EventKind::NewEdge, EventKind::NewEdge]);
    assert_eq!(o.events[0].source_workload, Some(wl("frontend")));
    assert_eq!(
        o.events[1].detail,
        "first seen: 1 request denied; for example tcp denied by shop/orders-allow (rule frontend) at the destination's sidecar"
    );
    assert!(d.observe(&[nobody], T0 + 1).events.is_empty());
}

#[test]
fn learning_is_silent_and_remembers() {
    let mut d = Detector::new(3600, SpikeRule::default(), None);
    assert_eq!(d.learning_until(), None);
    assert!(d.observe(&[], T0).events.is_empty());
    assert_eq!(d.learning_start(), None, "an empty report starts nothing");

    let o = d.observe(&[allowed("frontend", "orders")], T0);
    assert!(o.events.is_empty());
    assert_eq!(d.learning_until(), Some(T0 + 3600));
    let o = d.observe(&[allowed("cart", "orders")], T0 + 3599);
    assert!(o.events.is_empty());

    // After: what was learned stays quiet, what is new is reported.
    let o = d.observe(
        &[
            allowed("frontend", "orders"),
            allowed("cart", "orders"),
            allowed("admin", "orders"),
        ],
        T0 + 3600,
    );
    assert_eq!(kinds(&o), vec![EventKind::NewIdentity, EventKind::NewEdge]);
    assert_eq!(o.events[0].source_identity, Some(id("admin")));
}

#[test]
fn a_restart_keeps_what_the_store_kept() {
    let mut d = Detector::new(3600, SpikeRule::default(), Some(T0 - 7200));
    let stored = [allowed("frontend", "orders")];
    d.learn(stored.iter().map(|e| &e.key));
    assert_eq!(d.learning_until(), Some(T0 - 3600));
    assert!(d.observe(&stored, T0).events.is_empty());
    assert_eq!(d.observe(&[allowed("cart", "orders")], T0).events.len(), 2);
}

#[test]
fn denials_are_always_reported_even_while_learning() {
    let mut d = Detector::new(3600, SpikeRule::default(), None);
    let o = d.observe(&[denied("intruder", "payments", 34)], T0);
    assert_eq!(kinds(&o), vec![EventKind::DenialSpike]);
    let spike = &o.events[0];
    assert_eq!(spike.destination, Some(wl("payments")));
    assert_eq!((spike.requests, spike.denied), (34, 34));
    assert_eq!(
        spike.detail,
        "34 denied requests to shop/payments in one minute (usual: 0.0 per minute); top callers: spiffe://td.test/ns/shop/sa/intruder (34)"
    );
}

#[test]
fn a_spike_needs_the_minimum_within_a_sliding_minute() {
    let mut d = detector();
    d.learn([&denied("a", "orders", 1).key, &denied("b", "orders", 1).key]);
    // 19 denials, then one more 50 s later: 20 within a minute.
    assert!(
        d.observe(&[denied("a", "orders", 19)], T0)
            .events
            .is_empty()
    );
    let o = d.observe(&[denied("b", "orders", 1)], T0 + 50);
    assert_eq!(kinds(&o), vec![EventKind::DenialSpike]);
    assert!(
        o.events[0].detail.ends_with(
            "top callers: spiffe://td.test/ns/shop/sa/a (19), spiffe://td.test/ns/shop/sa/b (1)"
        ),
        "{}",
        o.events[0].detail
    );

    // Spread over more than a minute, 20 are no spike.
    let mut d = detector();
    d.learn([&denied("a", "cart", 1).key]);
    assert!(d.observe(&[denied("a", "cart", 10)], T0).events.is_empty());
    assert!(
        d.observe(&[denied("a", "cart", 10)], T0 + 70)
            .events
            .is_empty()
    );
    // Allowed requests never count.
    let mut allowed_many = allowed("a", "cart");
    allowed_many.stats.count = 1_000;
    assert!(d.observe(&[allowed_many], T0 + 71).events.is_empty());
}

/// With 10 denials a minute to orders as the usual rate: 49 within a minute from `at` are
/// not a spike, the 50th (5 times the usual) makes one, and its detail says what was usual.
fn spikes_at_five_times_ten_a_minute(d: &mut Detector, at: u64) {
    assert!(
        d.observe(&[denied("a", "orders", 49)], at)
            .events
            .is_empty()
    );
    let o = d.observe(&[denied("a", "orders", 1)], at + 1);
    assert_eq!(kinds(&o), vec![EventKind::DenialSpike]);
    assert!(
        o.events[0].detail.contains("(usual: 10.0 per minute)"),
        "{}",
        o.events[0].detail
    );
}

#[test]
fn a_spike_is_measured_against_the_usual_rate_and_cools_down() {
    let rule = SpikeRule {
        min_denials: 20,
        factor: 5.0,
    };
    let mut d = Detector::new(0, rule, None);
    d.learn([&denied("a", "orders", 1).key]);
    // Ten denials a minute for an hour: usual is 10, so a spike is 50.
    for minute in 0..60 {
        let o = d.observe(&[denied("a", "orders", 10)], T0 + minute * 60);
        assert!(o.events.is_empty(), "minute {minute}");
    }
    let now = T0 + 3600;
    spikes_at_five_times_ten_a_minute(&mut d, now);

    // Within ten minutes: no second event for that destination, however many more.
    for step in 1..10 {
        let o = d.observe(&[denied("a", "orders", 1_000)], now + step * 60);
        assert!(o.events.is_empty(), "{step} minutes later");
    }
    // Another destination has its own cooldown.
    let o = d.observe(&[denied("a", "cart", 25)], now + 120);
    assert_eq!(kinds(&o)[..], [EventKind::NewEdge, EventKind::DenialSpike]);
    // Ten minutes on, still far above the (now higher) usual rate: reported again.
    let o = d.observe(&[denied("a", "orders", 100_000)], now + 601);
    assert_eq!(kinds(&o), vec![EventKind::DenialSpike]);
}

#[test]
fn hostile_counts_saturate_and_never_panic() {
    let mut d = Detector::new(u64::MAX, SpikeRule::default(), None);
    let huge = denied("intruder", "orders", u64::MAX);
    let o = d.observe(&[huge.clone(), huge.clone()], u64::MAX - 1);
    assert_eq!(kinds(&o), vec![EventKind::DenialSpike]);
    assert_eq!(o.events[0].denied, u64::MAX);
    assert_eq!(d.learning_until(), Some(u64::MAX));
    // A clock gone back counts into the newest slot, and does not end the cooldown.
    let o = d.observe(std::slice::from_ref(&huge), 0);
    assert!(o.events.is_empty());
    let o = d.observe(std::slice::from_ref(&huge), u64::MAX - 1);
    assert!(o.events.is_empty(), "{o:?}");

    let mut d = Detector::new(
        0,
        SpikeRule {
            min_denials: 0,
            factor: f64::NAN,
        },
        None,
    );
    let o = d.observe(&[huge.clone(), huge], 0);
    assert_eq!(
        kinds(&o)[..],
        [
            EventKind::NewIdentity,
            EventKind::NewEdge,
            EventKind::DenialSpike
        ]
    );
    assert_eq!(
        (o.events[1].requests, o.events[1].denied),
        (u64::MAX, u64::MAX)
    );
    assert_eq!(
        outcome(u64::MAX, u64::MAX),
        "18446744073709551615 requests denied"
    );
    // An edge of no requests is no traffic: it neither starts learning nor is news.
    let mut d = Detector::new(60, SpikeRule::default(), None);
    assert_eq!(
        d.observe(&[denied("x", "y", 0)], T0),
        Observation::default()
    );
    assert_eq!(d.learning_start(), None);
}

#[test]
fn memory_is_bounded() {
    let mut d = detector();
    d.identities.extend(
        (0..MAX_KNOWN_IDENTITIES).map(|i| format!("spiffe://td.test/{i}").parse().unwrap()),
    );
    let o = d.observe(&[allowed("late", "orders")], T0);
    assert_eq!(kinds(&o), vec![EventKind::NewEdge]);
    assert_eq!(o.unremembered, 1);

    let mut d = detector();
    for i in 0..MAX_WATCHED_DESTINATIONS {
        d.denials.insert(wl(&format!("w{i}")), Denials::default());
    }
    // Idle destinations make room for a new one.
    let o = d.observe(&[denied("a", "new", 30)], T0);
    assert_eq!(o.unremembered, 0);
    assert_eq!(d.denials.len(), 1);

    let mut d = detector();
    let callers: Vec<Edge> = (0..2 * MAX_CALLER_TALLIES)
        .map(|i| denied(&format!("c{i}"), "orders", 1))
        .collect();
    let o = d.observe(&callers, T0);
    assert_eq!(
        o.events.last().map(|e| e.kind),
        Some(EventKind::DenialSpike)
    );
    assert_eq!(o.events.last().map(|e| e.denied), Some(512));
    assert_eq!(d.denials[&wl("orders")].callers.len(), MAX_CALLER_TALLIES);
}

#[test]
fn an_event_reads_and_writes_as_json() {
    let mut d = detector();
    let mut event = d
        .observe(&[allowed("frontend", "orders")], T0)
        .events
        .remove(1);
    event.seq = 7;
    let json = serde_json::to_string(&event).unwrap();
    assert!(
        json.starts_with(
            r#"{"seq":7,"at":1714557600,"kind":"new-edge","sourceIdentity":"spiffe://td.test/ns/shop/sa/frontend","sourceWorkload":{"namespace":"shop","name":"frontend"},"destination":{"namespace":"shop","name":"orders"},"port":8080,"requests":1,"denied":0,"detail":"#
        ),
        "{json}"
    );
    assert_eq!(serde_json::from_str::<Event>(&json).unwrap(), event);
    assert!(serde_json::from_str::<Event>(&json.replace("\"port\"", "\"prt\"")).is_err());
}

#[test]
fn a_restart_recalls_the_usual_denial_rate() {
    // Before the restart: 1,200 denials to orders over the last 2 hours, 10 a minute.
    let mut d = detector();
    d.learn([&denied("a", "orders", 1).key]);
    d.recall_denials([(wl("orders"), 1_200), (wl("cart"), 0)], 7_200, T0);
    spikes_at_five_times_ten_a_minute(&mut d, T0);

    // Without the recall, 49 would have been a spike; and the recalled rate fades out of
    // the baseline an hour later.
    let mut fresh = detector();
    fresh.learn([&denied("a", "orders", 1).key]);
    let o = fresh.observe(&[denied("a", "orders", 49)], T0);
    assert_eq!(kinds(&o), vec![EventKind::DenialSpike]);
    let mut later = detector();
    later.learn([&denied("a", "orders", 1).key]);
    later.recall_denials([(wl("orders"), 1_200)], 7_200, T0);
    let o = later.observe(&[denied("a", "orders", 49)], T0 + 3_700);
    assert_eq!(kinds(&o), vec![EventKind::DenialSpike]);

    // A burst just before the restart is spread over an hour at least: 100 denials in the
    // last minute are recalled as 1.7 a minute, so 20 more are still a spike.
    let mut burst = detector();
    burst.learn([&denied("a", "orders", 1).key]);
    burst.recall_denials([(wl("orders"), 100)], 60, T0);
    let o = burst.observe(&[denied("a", "orders", 20)], T0);
    assert_eq!(kinds(&o), vec![EventKind::DenialSpike]);
}
