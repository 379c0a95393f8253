//! Audit-mode DefaultPostures: staging a posture change and reading what it would deny.

use super::{Case, DECLARATIONS, FRONTEND, ORDERS, compile, decide, first_error, ingress, wref};
use bulkhead_policy::model::Direction;
use bulkhead_policy::{PolicySet, Verdict, load, relevant_to};

const API: &str = "apiVersion: bulkhead.dev/v1alpha1";
const PAYMENTS: &str = "spiffe://td/ns/shop/sa/payments";

fn posture(name: &str, namespace: Option<&str>, spec: &str) -> String {
    let ns = namespace
        .map(|n| format!(", namespace: {n}"))
        .unwrap_or_default();
    format!("---\n{API}\nkind: DefaultPosture\nmetadata: {{name: {name}{ns}}}\nspec: {spec}\n")
}

/// The adoption workflow for `shop`: traffic observed under `ingress: allow`, a recommended
/// allow policy for `orders`, and `ingress: deny`. `staged`: the last two in audit mode;
/// otherwise enforced, with the observing posture removed.
fn adoption(staged: bool) -> String {
    let (observe, mode_flow, mode_block) = match staged {
        true => (
            posture("observe", Some("shop"), "{ingress: allow}"),
            ", mode: audit",
            "  mode: audit\n",
        ),
        false => (String::new(), "", ""),
    };
    observe
        + &posture(
            "staged",
            Some("shop"),
            &format!("{{ingress: deny{mode_flow}}}"),
        )
        + &format!(
            "---\n{API}\nkind: AuthorizationPolicy\nmetadata: {{name: orders-allow-frontend, namespace: shop}}\nspec:\n  selector: {{workload: orders}}\n  action: allow\n{mode_block}  rules:\n    - name: frontend-reads\n      from: {{identities: [\"{FRONTEND}\"]}}\n      to: {{methods: [GET], paths: [\"/orders/*\"]}}\n"
        )
}

/// Each case: the request, the explanation, the `x-bulkhead-decision` value.
fn check_decisions(set: &PolicySet, cases: &[(Case<'_>, &str, &str)]) {
    for (c, text, header) in cases {
        let d = decide(set, c);
        assert_eq!(&d.to_string(), text, "{} from {}", c.subject, c.peer);
        assert_eq!(&d.header_value(), header, "{} from {}", c.subject, c.peer);
    }
}

fn egress<'a>(subject: &'a str, peer: &'a str, workload: &'a str) -> Case<'a> {
    Case {
        direction: Direction::Egress,
        peer_workload: Some(workload),
        ..ingress(subject, peer, "GET", "/orders/1")
    }
}

#[test]
fn an_audit_posture_shows_what_enforcing_it_would_deny() {
    let set = compile(&adoption(true));
    check_decisions(
        &set,
        &[
            // The recommended rule covers it: allowed now, and no audit difference.
            (
                ingress("shop/orders", FRONTEND, "GET", "/orders/1"),
                "allowed by default: namespace posture shop/observe (revision 7)",
                "allow; policy=default-allow; revision=7",
            ),
            // Nothing would allow it: the audit posture would deny it, with the nearest miss.
            (
                ingress("shop/orders", PAYMENTS, "GET", "/orders/1"),
                "allowed by default: namespace posture shop/observe (revision 7); audit: would deny (default deny by audit namespace posture shop/staged; nearest miss: policy shop/orders-allow-frontend rule frontend-reads matched the method and path but not identity spiffe://td/ns/shop/sa/payments)",
                "allow; policy=default-allow; revision=7; audit=would-deny; audit-policy=default-deny; audit-posture=shop/staged",
            ),
            (
                ingress("shop/orders", FRONTEND, "DELETE", "/orders/1"),
                "allowed by default: namespace posture shop/observe (revision 7); audit: would deny (default deny by audit namespace posture shop/staged; nearest miss: policy shop/orders-allow-frontend rule frontend-reads matched the identity and path but not method DELETE)",
                "allow; policy=default-allow; revision=7; audit=would-deny; audit-policy=default-deny; audit-posture=shop/staged",
            ),
            // No policy selects payments: the posture alone applies, in both evaluations.
            (
                ingress("shop/payments", ORDERS, "POST", "/charge"),
                "allowed by default: namespace posture shop/observe (revision 7); audit: would deny (default deny by audit namespace posture shop/staged; no allow policy selects this workload)",
                "allow; policy=default-allow; revision=7; audit=would-deny; audit-policy=default-deny; audit-posture=shop/staged",
            ),
            // The audit posture sets only ingress: egress has nothing to report.
            (
                egress("shop/frontend", ORDERS, "shop/orders"),
                "allowed by default: nothing restricts this direction (revision 7)",
                "allow; policy=default-allow; revision=7",
            ),
        ],
    );
    let d = decide(&set, &egress("shop/frontend", ORDERS, "shop/orders"));
    assert!(d.audit.is_none(), "{d:?}");
    let d = decide(&set, &ingress("shop/orders", PAYMENTS, "GET", "/orders/1"));
    assert!(d.would_deny());
}

#[test]
fn the_audit_outcome_is_the_verdict_once_enforced() {
    let staged = compile(&adoption(true));
    let files = vec![
        ("decl.yaml".to_string(), DECLARATIONS.to_string()),
        ("p.yaml".to_string(), adoption(false)),
    ];
    let (_, enforced) = load(&files, 8).unwrap_or_else(|e| panic!("refused: {e:?}"));
    let cases = [
        ingress("shop/orders", FRONTEND, "GET", "/orders/1"),
        ingress("shop/orders", FRONTEND, "GET", "/orders"),
        ingress("shop/orders", FRONTEND, "DELETE", "/orders/1"),
        ingress("shop/orders", PAYMENTS, "GET", "/orders/1"),
        ingress("shop/payments", ORDERS, "POST", "/charge"),
        egress("shop/frontend", ORDERS, "shop/orders"),
    ];
    for c in &cases {
        let before = decide(&staged, c);
        let after = decide(&enforced, c);
        let predicted = before
            .audit
            .as_ref()
            .map(|a| a.verdict)
            .unwrap_or(before.verdict);
        assert_eq!(predicted, after.verdict, "{before} / {after}");
        // And the staged decisions never deny: the observing posture still decides.
        assert_eq!(before.verdict, Verdict::Allow, "{before}");
    }
    assert_eq!(
        decide(
            &enforced,
            &ingress("shop/orders", PAYMENTS, "GET", "/orders/1")
        )
        .to_string(),
        "default deny: no policy allows this request (revision 8); nearest miss: policy shop/orders-allow-frontend rule frontend-reads matched the method and path but not identity spiffe://td/ns/shop/sa/payments"
    );
}

#[test]
fn mesh_audit_postures_and_lookup_order() {
    let set = compile(
        &(posture("open", None, "{ingress: allow, egress: deny}")
            + &posture("staged", None, "{ingress: deny, mode: audit}")
            + &posture("shop-open", Some("shop"), "{ingress: allow}")
            + &posture("shop-staged", Some("shop"), "{egress: allow, mode: audit}")),
    );
    check_decisions(
        &set,
        &[
            // Mesh audit posture, where the namespace sets nothing.
            (
                ingress("other/thing", ORDERS, "GET", "/"),
                "allowed by default: mesh posture */open (revision 7); audit: would deny (default deny by audit mesh posture */staged; no allow policy selects this workload)",
                "allow; policy=default-allow; revision=7; audit=would-deny; audit-policy=default-deny; audit-posture=*/staged",
            ),
            // The namespace's enforced posture comes before the mesh's audit posture.
            (
                ingress("shop/orders", FRONTEND, "GET", "/"),
                "allowed by default: namespace posture shop/shop-open (revision 7)",
                "allow; policy=default-allow; revision=7",
            ),
            // The namespace's audit posture comes before the mesh's enforced one: would allow.
            (
                egress("shop/frontend", ORDERS, "shop/orders"),
                "default deny: no policy allows this request (revision 7); no allow policy selects this workload; audit: would allow (default allow by audit namespace posture shop/shop-staged)",
                "deny; policy=default-deny; revision=7; audit=would-allow; audit-policy=default-allow; audit-posture=shop/shop-staged",
            ),
            (
                egress("other/thing", ORDERS, "shop/orders"),
                "default deny: no policy allows this request (revision 7); no allow policy selects this workload",
                "deny; policy=default-deny; revision=7",
            ),
        ],
    );
    assert!(
        decide(&set, &ingress("shop/orders", FRONTEND, "GET", "/"))
            .audit
            .is_none()
    );
}

#[test]
fn one_enforced_and_one_audit_posture_per_scope() {
    let rule = "there can be one enforced and one audit (mode: audit) DefaultPosture per namespace and for the mesh";
    let cases: Vec<(String, String)> = vec![
        (
            posture("a", Some("shop"), "{ingress: deny, mode: audit}")
                + &posture("b", Some("shop"), "{egress: deny, mode: audit}"),
            format!(
                "p.yaml:9:18: a second audit DefaultPosture for namespace shop (the first is DefaultPosture/shop/a, at p.yaml:4:18); {rule}"
            ),
        ),
        (
            posture("a", None, "{ingress: deny, mode: audit}")
                + &posture("b", None, "{ingress: allow, mode: audit}"),
            format!(
                "p.yaml:9:18: a second audit DefaultPosture for the mesh (the first is DefaultPosture/*/a, at p.yaml:4:18); {rule}"
            ),
        ),
        (
            posture("a", Some("shop"), "{ingress: deny}")
                + &posture("b", Some("shop"), "{ingress: allow, mode: enforce}"),
            format!(
                "p.yaml:9:18: a second DefaultPosture for namespace shop (the first is DefaultPosture/shop/a, at p.yaml:4:18); {rule}"
            ),
        ),
        (
            posture("a", Some("shop"), "{ingress: deny, mode: staged}"),
            "p.yaml:5:29: unknown variant `staged`".to_string(),
        ),
    ];
    for (yaml, want) in cases {
        let got = first_error(&[("decl.yaml", DECLARATIONS), ("p.yaml", &yaml)]);
        assert!(got.starts_with(&want), "want {want:?}\n got {got:?}");
    }
    // One of each mode in a scope is fine, in the mesh and in a namespace.
    compile(
        &(posture("a", Some("shop"), "{ingress: deny}")
            + &posture("b", Some("shop"), "{ingress: allow, mode: audit}")
            + &posture("c", None, "{ingress: deny}")
            + &posture("d", None, "{ingress: allow, mode: audit}")),
    );
}

#[test]
fn a_proxy_receives_both_postures_and_old_readers_refuse_audit_ones() {
    let text = adoption(true);
    let files = vec![
        ("decl.yaml".to_string(), DECLARATIONS.to_string()),
        ("p.yaml".to_string(), text),
    ];
    let (all, full) = load(&files, 7).unwrap_or_else(|e| panic!("refused: {e:?}"));
    let subset = relevant_to(&all, &wref("shop/payments"));
    let keys: Vec<String> = subset.iter().map(|r| r.key()).collect();
    assert_eq!(
        keys,
        [
            "Workload/shop/payments",
            "DefaultPosture/shop/observe",
            "DefaultPosture/shop/staged"
        ]
    );
    let part = PolicySet::compile(&subset, 7).unwrap_or_else(|e| panic!("refused: {e:?}"));
    let c = ingress("shop/payments", ORDERS, "POST", "/charge");
    assert_eq!(decide(&part, &c), decide(&full, &c));

    // An enforced posture is written without `mode`, so a reader that predates audit
    // postures still accepts it; an audit one carries `mode` and such a reader refuses it.
    let json: Vec<String> = subset[1..]
        .iter()
        .map(|r| r.to_json().unwrap_or_else(|e| panic!("{e}")))
        .collect();
    assert!(!json[0].contains("mode"), "{}", json[0]);
    assert!(json[1].contains(r#""mode":"audit""#), "{}", json[1]);
    assert_eq!(subset[1].summary(), "ingress allow, egress (inherit)");
    assert_eq!(
        subset[2].summary(),
        "ingress deny, egress (inherit) (audit)"
    );
}
