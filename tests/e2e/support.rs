//! Assertions shared by the suite.

use std::time::Duration;

use serde_json::Value;

/// Generous bound for anything that should take moments.
pub const WAIT: Duration = Duration::from_secs(20);

fn schema(name: &str) -> jsonschema::Validator {
    let path = format!("{}/schemas/{name}", env!("CARGO_MANIFEST_DIR"));
    let schema: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    jsonschema::options()
        .should_validate_formats(true)
        .build(&schema)
        .unwrap()
}

/// Panics unless `result` is a valid result message (contract result.schema.json).
pub fn assert_valid_result(result: &Value) {
    let v = schema("result.schema.json");
    let errors: Vec<String> = v.iter_errors(result).map(|e| e.to_string()).collect();
    assert!(
        errors.is_empty(),
        "result breaks result.schema.json: {errors:?}\n{result:#}"
    );
}

/// Whether a job is valid according to job.schema.json.
pub fn job_schema_accepts(job: &Value) -> bool {
    schema("job.schema.json").is_valid(job)
}

/// The copies of the contract's schemas in tests/schemas must match the contract.
#[test]
fn schema_copies_match_the_contract() {
    let contract = format!("{}/../../shared/spec", env!("CARGO_MANIFEST_DIR"));
    if !std::path::Path::new(&contract).exists() {
        return; // only checkable where shared/ sits beside the checkout
    }
    for name in ["job.schema.json", "result.schema.json"] {
        let ours =
            std::fs::read_to_string(format!("{}/schemas/{name}", env!("CARGO_MANIFEST_DIR")))
                .unwrap();
        let theirs = std::fs::read_to_string(format!("{contract}/{name}")).unwrap();
        assert_eq!(ours, theirs, "{name} differs from the contract's copy");
    }
}
