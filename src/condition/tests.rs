//! Tests of the condition language: parsing (operators, precedence, literals, every error with
//! its message and column), caret rendering, hostile input, and evaluation against events.

use serde_json::{Value, json};

use super::expression::{Expression, Path, PathRoot, Segment};
use super::*;
use crate::domain::{Actor, EntityEvent, EventKind};

fn parsed(source: &str) -> Condition {
    Condition::parse(source)
        .unwrap_or_else(|error| panic!("{source:?} should parse: {error}\n{}", error.caret()))
}

fn parse_error(source: &str) -> ConditionError {
    match Condition::parse(source) {
        Ok(condition) => panic!("{source:?} should not parse, got {condition:?}"),
        Err(error) => error,
    }
}

/// Asserts the error for `source` has exactly `message` at `column`.
fn assert_error(source: &str, message: &str, column: usize) {
    let error = parse_error(source);
    assert_eq!(error.message, message, "message for {source:?}");
    assert_eq!(
        error.column,
        column,
        "column for {source:?}: {}",
        error.caret()
    );
}

fn holds(source: &str, event: &EntityEvent) -> bool {
    parsed(source).evaluate(event)
}

fn order_data() -> Value {
    json!({
        "id": 1,
        "status": "paid",
        "total": 150,
        "ratio": 1.5,
        "is_vip": true,
        "archived": false,
        "customer": {
            "name": "Ada",
            "email": null,
            "address": {"city": "Paris"}
        },
        "items": [{"sku": "A-1", "quantity": 2}, {"sku": "B-2", "quantity": 1}],
        "tags": ["vip", "eu"],
        "weird key": "w",
        "a.b": "dotted",
        "it's": "quoted",
        "say \"hi\"": "double quoted",
        "[x]": "bracketed",
        "clé spéciale": "ünïcødé"
    })
}

/// An UPDATE whose only change is `status`: `new` → `paid`.
fn order_update() -> EntityEvent {
    let mut before = order_data();
    before["status"] = json!("new");
    EntityEvent::new(EventKind::Update, "Order", "1", order_data(), Some(before))
}

fn order_insert() -> EntityEvent {
    EntityEvent::new(EventKind::Insert, "Order", "1", order_data(), None)
}

fn order_delete() -> EntityEvent {
    EntityEvent::new(
        EventKind::Delete,
        "Order",
        "1",
        Value::Null,
        Some(order_data()),
    )
}

fn path(root: PathRoot, keys: &[&str]) -> Expression {
    Expression::Path(Path {
        root,
        segments: keys.iter().map(|key| Segment::new(key)).collect(),
    })
}

fn literal_of(source: &str) -> Value {
    match parsed(source).expression {
        Expression::Literal(value) => value,
        other => panic!("{source:?} should be a literal, got {other:?}"),
    }
}

// ---------------------------------------------------------------- parsing: operators

#[test]
fn every_comparison_operator_holds_and_fails() {
    let event = order_update();
    for (source, expected) in [
        ("data.total == 150", true),
        ("data.total == 151", false),
        ("data.total != 151", true),
        ("data.total != 150", false),
        ("data.total > 100", true),
        ("data.total > 150", false),
        ("data.total >= 150", true),
        ("data.total >= 151", false),
        ("data.total < 200", true),
        ("data.total < 150", false),
        ("data.total <= 150", true),
        ("data.total <= 149", false),
    ] {
        assert_eq!(holds(source, &event), expected, "{source}");
    }
}

#[test]
fn logical_operators_and_keyword_aliases() {
    let event = order_update();
    assert!(holds("data.is_vip && data.total > 100", &event));
    assert!(!holds("data.is_vip && data.total > 200", &event));
    assert!(holds("data.archived || data.is_vip", &event));
    assert!(!holds("data.archived || data.missing", &event));
    assert!(holds("!data.archived", &event));
    assert!(holds("data.is_vip and not data.archived", &event));
    assert!(holds("data.archived or data.is_vip", &event));
    assert!(!holds("not data.is_vip", &event));
}

#[test]
fn and_binds_tighter_than_or() {
    assert_eq!(
        parsed("data.a || data.b && data.c").expression,
        Expression::AnyOf(Box::new([
            path(PathRoot::Data, &["a"]),
            Expression::AllOf(Box::new([
                path(PathRoot::Data, &["b"]),
                path(PathRoot::Data, &["c"]),
            ])),
        ]))
    );
    let event = order_update();
    assert!(holds("true || false && false", &event));
    assert!(holds("false && false || true", &event));
    assert!(!holds("(true || false) && false", &event));
}

#[test]
fn chains_of_and_and_or_are_flat() {
    let Expression::AllOf(requirements) = parsed("true && true && true && false").expression else {
        panic!("expected a flat AllOf");
    };
    assert_eq!(requirements.len(), 4);
}

#[test]
fn not_applies_to_the_whole_comparison() {
    // `!(150 > 200)` is true; `(!150) > 200` would be false.
    assert!(holds("!data.total > 200", &order_update()));
    assert!(matches!(
        parsed("!data.total > 200").expression,
        Expression::Not(inner) if matches!(*inner, Expression::Compare { .. })
    ));
}

#[test]
fn in_binds_tighter_than_comparison_and_contains_tighter_than_in() {
    let event = order_update();
    assert!(holds("data.status in ['paid'] == true", &event));
    assert!(holds("data.tags contains 'vip' in [true]", &event));
    assert!(holds("(data.total > 10) == true", &event));
    assert!(holds("(data.total > 10 && data.is_vip) != false", &event));
}

#[test]
fn parentheses_group() {
    let event = order_update();
    assert!(holds(
        "(data.archived || data.is_vip) && (data.total == 150)",
        &event
    ));
    assert!(!holds(
        "data.archived || (data.is_vip && data.total == 1)",
        &event
    ));
    assert!(holds("((((true))))", &event));
}

// ---------------------------------------------------------------- parsing: literals

#[test]
fn string_literals_decode_every_escape() {
    assert_eq!(
        literal_of(r#"'it\'s \"q\" \\ \/ \n\t\r\0 \u00e9 \ud83d\ude00'"#),
        json!("it's \"q\" \\ / \n\t\r\0 é 😀")
    );
    assert_eq!(
        literal_of(r#""double 'quoted' \" ok""#),
        json!("double 'quoted' \" ok")
    );
    assert_eq!(literal_of("''"), json!(""));
    assert_eq!(literal_of("'ünïcødé 日本'"), json!("ünïcødé 日本"));
}

#[test]
fn number_literals_keep_integers_exact() {
    assert_eq!(literal_of("42"), json!(42));
    assert_eq!(literal_of("-7"), json!(-7));
    assert_eq!(literal_of("3.25"), json!(3.25));
    assert_eq!(literal_of("1e3"), json!(1000.0));
    assert_eq!(literal_of("-2.5E-3"), json!(-0.0025));
    assert_eq!(literal_of("18446744073709551615"), json!(u64::MAX));
    assert_eq!(literal_of("-9223372036854775808"), json!(i64::MIN));
    assert_eq!(literal_of("0"), json!(0));
}

#[test]
fn keyword_and_list_literals() {
    assert_eq!(literal_of("true"), json!(true));
    assert_eq!(literal_of("false"), json!(false));
    assert_eq!(literal_of("null"), json!(null));
    assert_eq!(
        literal_of("[1, 'a', null, [true, []]]"),
        json!([1, "a", null, [true, []]])
    );
    assert_eq!(literal_of("[1, 2,]"), json!([1, 2]));
    assert_eq!(literal_of("[]"), json!([]));
}

#[test]
fn paths_parse_into_roots_and_segments() {
    assert_eq!(
        parsed(r#"data.items[0]["sku"]"#).expression,
        path(PathRoot::Data, &["items", "0", "sku"])
    );
    assert_eq!(
        parsed("changes.status.new").expression,
        path(PathRoot::Changes, &["status", "new"])
    );
    assert_eq!(
        parsed("tenant_id").expression,
        path(PathRoot::TenantId, &[])
    );
    assert_eq!(Segment::new("12").index, Some(12));
    assert_eq!(Segment::new("sku").index, None);
    assert_eq!(Segment::new("+1").index, None);
}

// ---------------------------------------------------------------- parsing: errors

#[test]
fn missing_operand_points_at_the_end() {
    assert_error(
        "data.total >",
        "expected an operand after '>', found end of input",
        13,
    );
    assert_error(
        "data.total > 100 &&",
        "expected an operand after '&&', found end of input",
        20,
    );
    assert_error(
        "data.total > && true",
        "expected an operand after '>', found '&&'",
        14,
    );
    assert_error(
        "data.a in",
        "expected an operand after 'in', found end of input",
        10,
    );
    assert_error(
        "data.a == in",
        "expected an operand after '==', found 'in'",
        11,
    );
    assert_error("()", "expected an operand after '(', found ')'", 2);
    assert_error("&& true", "expected an operand, found '&&'", 1);
}

#[test]
fn error_display_is_message_at_column() {
    assert_eq!(
        parse_error("data.total > 100 &&").to_string(),
        "expected an operand after '&&', found end of input at column 20"
    );
}

#[test]
fn unknown_root_lists_the_valid_roots() {
    assert_error(
        "dta.x == 1",
        "unknown name 'dta': expected a path starting with one of data, before, changes, \
         event_type, entity_type, entity_id, tenant_id, actor_type, actor_id, a literal or a \
         function call",
        1,
    );
    assert_eq!(parse_error("data.x == 1 && TRUE").column, 16);
}

#[test]
fn unterminated_strings() {
    assert_error(
        "data.status == 'paid",
        "unterminated string: expected ' to close the string opened at column 16, found end \
         of input",
        21,
    );
    assert_error(
        r#"data.status == "paid\""#,
        "unterminated string: expected \" to close the string opened at column 16, found end \
         of input",
        23,
    );
}

#[test]
fn bad_escapes() {
    assert_error(
        r"'a\qb'",
        "expected an escape (\\' \\\" \\\\ \\/ \\n \\t \\r \\0 or \\uXXXX) after '\\', found \
         '\\q'",
        3,
    );
    assert_error(
        r"'\u12G4'",
        "expected 4 hex digits after '\\u', found 'G'",
        6,
    );
    assert_error(
        r"'\ud83d x'",
        "expected a low surrogate escape \\uDC00-\\uDFFF after a high surrogate escape",
        8,
    );
    assert_error(
        r"'\ude00'",
        "expected a Unicode scalar value in \\u escape, found the lone surrogate DE00",
        2,
    );
}

#[test]
fn malformed_numbers() {
    assert_error(
        "data.a == 1.",
        "expected a digit after the decimal point, found end of input",
        13,
    );
    assert_error("data.a == - 1", "expected a digit after '-', found ' '", 12);
    assert_error(
        "data.a == 1e",
        "expected a digit after the exponent marker, found end of input",
        13,
    );
    assert_error(
        "data.a == 12abc",
        "expected an operator or delimiter after the number 12, found 'a'",
        13,
    );
    assert_error(
        "data.a == 1e999",
        "expected a number within the range of a 64-bit float, found 1e999",
        11,
    );
}

#[test]
fn stray_characters() {
    assert_error("data.a = 1", "expected '==', found a single '='", 8);
    assert_error("data.a & data.b", "expected '&&', found a single '&'", 8);
    assert_error("data.a | data.b", "expected '||', found a single '|'", 8);
    assert_error(
        "data.a == #",
        "expected a name, literal, operator or parenthesis, found the character '#'",
        11,
    );
}

#[test]
fn empty_conditions() {
    assert_error("", "condition is empty", 1);
    assert_error(" \n\t ", "condition is empty", 1);
}

#[test]
fn unbalanced_parentheses() {
    assert_error(
        "((data.a == 1)",
        "expected ')' to close '(' opened at column 1, found end of input",
        15,
    );
    assert_error(
        "data.a (",
        "expected an operator or end of input, found '('",
        8,
    );
    assert_error(
        "data.a == 1)",
        "expected an operator or end of input, found ')' without a matching '('",
        12,
    );
    assert_error(
        "(data.a data.b)",
        "expected ')' to close '(' opened at column 1, found 'data'",
        9,
    );
}

#[test]
fn comparisons_do_not_chain() {
    assert_error(
        "data.a == 1 == true",
        "expected '&&', '||' or end of input after a comparison, found '==' (comparisons cannot \
         be chained; join them with '&&')",
        13,
    );
}

#[test]
fn bad_path_segments() {
    assert_error(
        "data.",
        "expected a field name after '.', found end of input",
        6,
    );
    assert_error(
        "data.'x'",
        "expected a field name after '.', found string 'x'",
        6,
    );
    assert_error(
        "data[",
        "expected a quoted key or an array index after '[', found end of input",
        6,
    );
    assert_error(
        "data[-1]",
        "expected a non-negative integer array index inside '[', found number -1",
        6,
    );
    assert_error(
        "data['a' == 1",
        "expected ']' to close '[' opened at column 5, found '=='",
        10,
    );
    assert_error(
        "event_type.name == 'x'",
        "expected an operator after event_type (a text value without fields), found '.'",
        11,
    );
    assert_error(
        "changes.status.newest == 1",
        "expected 'old' or 'new' after changes.status, found 'newest'",
        16,
    );
}

#[test]
fn bad_membership_and_lists() {
    assert_error(
        "data.a not data.b",
        "expected 'in' after 'not', found 'data'",
        12,
    );
    assert_error(
        "data.a in [1 2]",
        "expected ',' or ']' to close the list opened at column 11, found number 2",
        14,
    );
    assert_error(
        "data.a in [data.b]",
        "expected a literal (string, number, true, false, null or list) as a list element, \
         found 'data'",
        12,
    );
    assert_error(
        "data.a in [1,",
        "expected a literal (string, number, true, false, null or list) as a list element, \
         found end of input",
        14,
    );
}

#[test]
fn unknown_function_names_the_known_ones() {
    assert_error(
        "foo('x')",
        "unknown function 'foo': expected one of has_field(field: string), field_changed(field: \
         string), field_changed_to(field: string, value), field_changed_from(field: string, \
         value)",
        1,
    );
}

#[test]
fn wrong_arity_names_the_signature() {
    assert_error(
        "field_changed_to('status')",
        "wrong number of arguments: expected 2 for field_changed_to(field: string, value), found 1",
        26,
    );
    assert_error(
        "has_field('a', 'b')",
        "wrong number of arguments: expected 1 for has_field(field: string), found 2",
        16,
    );
    assert_error(
        "field_changed()",
        "wrong number of arguments: expected 1 for field_changed(field: string), found 0",
        15,
    );
}

#[test]
fn wrong_argument_types_name_the_signature() {
    assert_error(
        "field_changed(3)",
        "expected a non-empty string naming the field as the first argument of \
         field_changed(field: string), found number 3",
        15,
    );
    assert_error(
        "field_changed_from('', 1)",
        "expected a non-empty string naming the field as the first argument of \
         field_changed_from(field: string, value), found string ''",
        20,
    );
    assert_error(
        "field_changed_to('status', data.status)",
        "expected a literal (string, number, true, false, null or list) as an argument of \
         field_changed_to(field: string, value), found 'data'",
        28,
    );
    assert_error(
        "has_field('a..b')",
        "expected a dotted field path such as 'customer.email' in has_field(field: string), \
         found string 'a..b' with an empty part",
        11,
    );
    assert_error(
        "has_field == 1",
        "expected '(' after has_field, found '==': call it as has_field(field: string)",
        11,
    );
    assert_error(
        "has_field('a' 'b')",
        "expected ',' or ')' to close the call to has_field opened at column 10, found string 'b'",
        15,
    );
}

#[test]
fn long_tokens_are_shortened_in_messages() {
    let long_name = "x".repeat(100);
    let error = parse_error(&format!("data.a {long_name}"));
    assert_eq!(
        error.message,
        format!(
            "expected an operator or end of input, found '{}…'",
            "x".repeat(30)
        )
    );
}

// ---------------------------------------------------------------- caret rendering

#[test]
fn caret_points_under_the_column() {
    assert_eq!(
        parse_error("data.total > && true").caret(),
        "data.total > && true\n             ^"
    );
    assert_eq!(
        parse_error("data.total >").caret(),
        "data.total >\n            ^"
    );
    assert_eq!(parse_error("dta.x").caret(), "dta.x\n^");
}

#[test]
fn caret_counts_characters_and_blanks_newlines() {
    let error = parse_error("data[\"clé\"] ==\n 'é' &&");
    assert_eq!(error.column, 23);
    assert_eq!(
        error.caret(),
        "data[\"clé\"] ==  'é' &&\n                      ^"
    );
}

#[test]
fn caret_shows_a_window_of_a_long_condition() {
    let source = format!("{}'x' ==", "data.a == 1 && ".repeat(20));
    let error = parse_error(&source);
    assert_eq!(error.column, source.chars().count() + 1);
    let caret = error.caret();
    let (shown, marker) = caret.split_once('\n').expect("two lines");
    assert!(shown.chars().count() <= 80, "window too wide: {shown:?}");
    assert!(
        source.ends_with(shown),
        "window should end at the end of input: {shown:?}"
    );
    assert_eq!(marker.chars().count() - 1, shown.chars().count());
    assert!(marker.ends_with('^'));

    let middle_error = parse_error(&format!(
        "{}#{}",
        "data.a == 1 && ".repeat(10),
        "x".repeat(200)
    ));
    let middle_caret = middle_error.caret();
    let (shown, marker) = middle_caret.split_once('\n').expect("two lines");
    assert_eq!(shown.chars().count(), 80);
    assert_eq!(shown.chars().nth(marker.len() - 1), Some('#'));
}

// ---------------------------------------------------------------- hostile input

#[test]
fn a_megabyte_condition_is_rejected_by_length() {
    let source = format!("data.x == '{}'", "a".repeat(1024 * 1024));
    let error = parse_error(&source);
    assert_eq!(
        error.message,
        format!(
            "condition is too long: expected at most 16384 bytes, found {}",
            source.len()
        )
    );
    assert_eq!(error.column, MAX_CONDITION_LENGTH + 1);
    assert!(
        error
            .caret()
            .lines()
            .next()
            .expect("first line")
            .chars()
            .count()
            <= 80
    );
}

#[test]
fn the_length_limit_is_in_bytes_and_the_column_in_characters() {
    let at_limit = format!("'{}'", "a".repeat(MAX_CONDITION_LENGTH - 2));
    assert_eq!(at_limit.len(), MAX_CONDITION_LENGTH);
    assert!(Condition::parse(&at_limit).is_ok());
    let multibyte = "é".repeat(MAX_CONDITION_LENGTH);
    let error = parse_error(&multibyte);
    assert_eq!(error.column, MAX_CONDITION_LENGTH / 2 + 1);
}

#[test]
fn ten_thousand_open_parentheses_hit_the_depth_limit() {
    let source = format!("{}true", "(".repeat(10_000));
    assert_error(
        &source,
        "nesting too deep: expected at most 64 levels of parentheses, '!' and lists, found more",
        MAX_NESTING_DEPTH + 1,
    );
    let at_limit = format!("{}true{}", "(".repeat(64), ")".repeat(64));
    assert!(holds(&at_limit, &order_update()));
    let over_limit = format!("{}true{}", "(".repeat(65), ")".repeat(65));
    assert_eq!(parse_error(&over_limit).column, 65);
}

#[test]
fn ten_thousand_nots_hit_the_depth_limit() {
    let source = format!("{}true", "!".repeat(10_000));
    assert_eq!(parse_error(&source).column, 65);
    assert!(parse_error(&source).message.starts_with("nesting too deep"));
    assert!(holds(&format!("{}true", "!".repeat(64)), &order_update()));
    assert!(!holds(&format!("{}true", "!".repeat(63)), &order_update()));
}

#[test]
fn deeply_nested_lists_hit_the_depth_limit() {
    let source = format!("data.a in {}", "[".repeat(10_000));
    let error = parse_error(&source);
    assert!(error.message.starts_with("nesting too deep"));
    assert_eq!(error.column, 11 + 64);
    let mixed = format!("{}data.a in {}", "(".repeat(40), "[".repeat(40));
    // 40 parentheses, then `data.a in ` (10 characters), then the 25th bracket is level 65.
    assert_eq!(parse_error(&mixed).column, 40 + 10 + 25);
}

#[test]
fn long_and_chains_do_not_recurse() {
    let source = vec!["data.is_vip"; 1_000].join(" && ");
    assert!(holds(&source, &order_update()));
}

#[test]
fn non_ascii_keys_and_values() {
    let event = order_update();
    assert!(holds("data[\"clé spéciale\"] == 'ünïcødé'", &event));
    assert!(!holds("data[\"clé spéciale\"] == 'unicode'", &event));
    let event = EntityEvent::new(
        EventKind::Insert,
        "Commande",
        "1",
        json!({"prénom": "Zoë", "日本": "東京"}),
        None,
    );
    assert!(holds(
        "data.prénom == 'Zoë' && data.日本 contains '京'",
        &event
    ));
    let error = parse_error("data.prénom == 'Zoë' &&");
    assert_eq!(error.column, 24);
}

#[test]
fn keys_with_dots_quotes_and_brackets() {
    let event = order_update();
    assert!(holds(r#"data["a.b"] == 'dotted'"#, &event));
    assert!(holds(r#"data["it's"] == 'quoted'"#, &event));
    assert!(holds(r"data['it\'s'] == 'quoted'", &event));
    assert!(holds(r#"data['say "hi"'] == 'double quoted'"#, &event));
    assert!(holds(r#"data["[x]"] == 'bracketed'"#, &event));
    assert!(holds(r#"data["weird key"] == 'w'"#, &event));
    assert!(holds("data.a.b == null", &event));
}

fn nested_object(depth: usize) -> Value {
    let mut value = json!(1);
    for _ in 0..depth {
        value = json!({ "a": value });
    }
    value
}

fn nested_array(depth: usize) -> Value {
    let mut value = json!([1]);
    for _ in 0..depth {
        value = json!([value]);
    }
    value
}

#[test]
fn deeply_nested_data_is_reached_by_a_long_path() {
    let event = EntityEvent::new(
        EventKind::Insert,
        "Deep",
        "1",
        json!({"root": nested_object(200)}),
        None,
    );
    let two_hundred = ".a".repeat(200);
    assert!(holds(&format!("data.root{two_hundred} == 1"), &event));
    assert!(holds(&format!("data.root{two_hundred}.a == null"), &event));
    assert!(holds(&format!("has_field('root{two_hundred}')"), &event));
    assert!(!holds(&format!("has_field('root{two_hundred}.a')"), &event));
}

#[test]
fn comparing_deeply_nested_data_does_not_recurse() {
    let event = EntityEvent::new(
        EventKind::Insert,
        "Deep",
        "1",
        json!({"left": nested_array(1_000), "right": nested_array(1_000), "other": nested_array(999)}),
        None,
    );
    assert!(holds("data.left == data.right", &event));
    assert!(!holds("data.left == data.other", &event));
    assert!(holds("data.left in [[[[1]]]] == false", &event));
}

// ---------------------------------------------------------------- evaluation

#[test]
fn event_types_and_scalar_roots() {
    let mut update = order_update();
    assert!(holds("event_type == 'UPDATE'", &update));
    assert!(holds("event_type == 'INSERT'", &order_insert()));
    assert!(holds("event_type == 'DELETE'", &order_delete()));
    assert!(holds("entity_type == 'Order' && entity_id == '1'", &update));
    assert!(holds(
        "tenant_id == null && actor_type == null && actor_id == null",
        &update
    ));
    update.tenant_id = Some("acme".into());
    update.actor = Some(Actor {
        kind: Some("user".into()),
        id: Some("42".into()),
    });
    assert!(holds(
        "tenant_id == 'acme' && actor_type == 'user' && actor_id == '42'",
        &update
    ));
    assert!(holds(
        "entity_id contains '1' && actor_type in ['user', 'system']",
        &update
    ));
}

#[test]
fn data_and_before_paths() {
    let update = order_update();
    assert!(holds("data.customer.address.city == 'Paris'", &update));
    assert!(holds(
        "data.items[0].sku == 'A-1' && data.items.1.quantity == 1",
        &update
    ));
    assert!(holds(
        "before.status == 'new' && data.status == 'paid'",
        &update
    ));
    assert!(holds(
        "before == null && before.status == null",
        &order_insert()
    ));
    assert!(holds(
        "data == null && before.total == 150",
        &order_delete()
    ));
}

#[test]
fn missing_paths_are_null() {
    let event = order_update();
    assert!(holds("data.nope == null", &event));
    assert!(holds("data.customer.address.zip == null", &event));
    assert!(holds("data.items[5].sku == null", &event));
    assert!(holds("data.total.cents == null", &event));
    assert!(holds("data.customer[0] == null", &event));
    assert!(holds("data.items.first == null", &event));
    assert!(!holds("data.nope > 1", &event));
    assert!(!holds("data.nope < 1", &event));
    assert!(holds("data.nope != 1", &event));
    assert!(!holds("data.nope", &event));
    assert!(holds("!data.nope", &event));
}

#[test]
fn type_mismatches_are_false_not_errors() {
    let event = order_update();
    assert!(!holds("data.status > 1", &event));
    assert!(!holds("data.total == '150'", &event));
    assert!(!holds("data.tags < 'z'", &event));
    assert!(!holds("data.is_vip > false", &event));
    assert!(!holds("data.total contains 1", &event));
    assert!(!holds("data.status in 'paid'", &event));
    assert!(!holds("data.customer == ['Ada']", &event));
    assert!(holds("data.total != '150'", &event));
}

#[test]
fn numbers_compare_numerically() {
    let event = EntityEvent::new(
        EventKind::Insert,
        "Number",
        "1",
        json!({"int": 150, "float": 1.5, "big": 9_007_199_254_740_993_i64, "max": u64::MAX, "min": i64::MIN}),
        None,
    );
    assert!(holds("data.int == 150.0 && data.int == 1.5e2", &event));
    assert!(holds(
        "data.float > 1 && data.float < 2 && data.float == 1.5",
        &event
    ));
    assert!(!holds("data.float == 1", &event));
    assert!(holds(
        "data.big != 9007199254740992.0 && data.big > 9007199254740992.0",
        &event
    ));
    assert!(holds("data.big == 9007199254740993", &event));
    assert!(holds(
        "data.max > data.min && data.max > -1 && data.min < -9.2e18",
        &event
    ));
    assert!(holds(
        "data.max == 18446744073709551615 && data.max < 1e20",
        &event
    ));
    assert!(holds("data.int in [1, 150.0]", &event));
    assert!(holds("[1, 2.0] == [1.0, 2]", &event));
}

#[test]
fn strings_compare_lexicographically() {
    let event = order_update();
    assert!(holds(
        "data.status > 'new' && data.status < 'pending'",
        &event
    ));
    assert!(holds(
        "'apple' < 'banana' && 'b' >= 'b' && 'B' < 'a'",
        &event
    ));
}

#[test]
fn membership_with_in_and_not_in() {
    let event = order_update();
    assert!(holds("data.status in ['new', 'paid']", &event));
    assert!(!holds("data.status in ['new', 'cancelled']", &event));
    assert!(holds("data.status not in ['new', 'cancelled']", &event));
    assert!(!holds("data.status not in ['paid']", &event));
    assert!(holds("'vip' in data.tags", &event));
    assert!(!holds("data.status in data.tags", &event));
    assert!(holds("data.missing in [null] && null in [1, null]", &event));
    assert!(holds(
        "[1] in [[1], [2]] && data.tags in [['vip', 'eu']]",
        &event
    ));
    assert!(!holds("data.status in []", &event));
}

#[test]
fn contains_on_strings_arrays_and_objects() {
    let event = order_update();
    assert!(holds("data.customer.name contains 'd'", &event));
    assert!(!holds("data.customer.name contains 'z'", &event));
    assert!(holds("data.tags contains 'eu'", &event));
    assert!(!holds("data.tags contains 'us'", &event));
    assert!(holds("data.items contains data.items[1]", &event));
    assert!(holds("data.customer contains 'email'", &event));
    assert!(!holds("data.customer contains 'phone'", &event));
    assert!(!holds("data.customer contains 1", &event));
    assert!(holds(
        "changes contains 'status' && !(changes contains 'total')",
        &event
    ));
    assert!(holds("changes.status contains 'old'", &event));
    assert!(holds("[1, 2] contains 2.0", &event));
}

#[test]
fn bare_operands_are_true_only_when_json_true() {
    let event = order_update();
    assert!(holds("data.is_vip", &event));
    assert!(!holds("data.archived", &event));
    assert!(!holds("data.status", &event));
    assert!(!holds("data.total", &event));
    assert!(!holds("data.tags", &event));
    assert!(!holds("'true'", &event));
    assert!(!holds("changes.status", &event));
    assert!(holds("!data.archived && !data.status", &event));
}

#[test]
fn changes_paths() {
    let event = order_update();
    assert!(holds(
        "changes.status.new == 'paid' && changes.status.old == 'new'",
        &event
    ));
    assert!(holds(
        "changes.status != null && changes.total == null",
        &event
    ));
    assert!(holds("changes.total.new == null", &event));
    assert!(holds(
        "changes.status == changes.status && changes == changes",
        &event
    ));
    assert!(!holds("changes.status == 'paid'", &event));
    let insert = order_insert();
    assert!(holds(
        "changes.total.old == null && changes.total.new == 150",
        &insert
    ));
    assert!(holds(
        "changes.customer.new.address.city == 'Paris'",
        &insert
    ));
}

#[test]
fn functions_on_update() {
    let event = order_update();
    assert!(holds("has_field('customer.email')", &event));
    assert!(!holds("has_field('customer.phone')", &event));
    assert!(holds(
        "has_field('items.0.sku') && !has_field('items.9')",
        &event
    ));
    assert!(!holds("has_field('status.value')", &event));
    assert!(holds("field_changed('status')", &event));
    assert!(!holds("field_changed('total')", &event));
    assert!(holds("field_changed_to('status', 'paid')", &event));
    assert!(!holds("field_changed_to('status', 'new')", &event));
    assert!(!holds("field_changed_to('total', 150)", &event));
    assert!(holds("field_changed_from('status', 'new')", &event));
    assert!(!holds("field_changed_from('status', 'paid')", &event));
}

#[test]
fn functions_on_insert_and_delete() {
    let insert = order_insert();
    assert!(holds(
        "field_changed('total') && field_changed_to('total', 150.0)",
        &insert
    ));
    assert!(holds("field_changed_from('status', null)", &insert));
    let delete = order_delete();
    assert!(holds(
        "field_changed_to('status', null) && field_changed_from('status', 'paid')",
        &delete
    ));
    assert!(!holds("has_field('status')", &delete));
}

#[test]
fn typical_observer_conditions() {
    let condition = parsed("data.total > 100 && field_changed_to('status', 'paid')");
    assert!(condition.evaluate(&order_update()));
    assert!(!condition.evaluate(&order_delete()));
    let mut cheap = order_update();
    cheap.data["total"] = json!(99.99);
    assert!(!condition.evaluate(&cheap));
    let larger = parsed(
        "event_type in ['INSERT', 'UPDATE'] && data.customer.address.city in ['Paris', 'Lyon'] \
         && (data.tags contains 'vip' || data.total >= 1000) && data.items[0].sku not in ['X']",
    );
    assert!(larger.evaluate(&order_update()));
    assert!(!larger.evaluate(&order_delete()));
}

#[test]
fn condition_keeps_its_source_and_is_shareable() {
    fn assert_shareable<T: Clone + std::fmt::Debug + Send + Sync>() {}
    assert_shareable::<Condition>();
    let source = "data.total > 100";
    let condition: Condition = source.parse().expect("parses");
    assert_eq!(condition.source(), source);
    assert_eq!(condition.to_string(), source);
    assert_eq!(condition.clone().expression, condition.expression);
}

#[test]
fn operator_keywords_are_ordinary_field_names_after_a_dot() {
    let event = EntityEvent::new(
        EventKind::Insert,
        "Keyword",
        "1",
        json!({"in": 1, "contains": 2, "not": 3, "true": 4, "2fa": true}),
        None,
    );
    assert!(holds(
        "data.in == 1 && data.contains == 2 && data.not == 3",
        &event
    ));
    assert!(holds("data.true == 4 && data.2fa", &event));
}

#[test]
fn changes_equal_objects_of_the_same_shape() {
    let diff = json!({"status": {"old": "new", "new": "paid"}});
    let mut before = json!({"status": "new", "diff": diff});
    let event = EntityEvent::new(
        EventKind::Update,
        "Order",
        "1",
        json!({"status": "paid", "diff": diff, "other": {"old": "new", "new": "x"}}),
        Some(before.take()),
    );
    assert_eq!(event.changes.len(), 2, "status and other changed");
    assert!(holds("changes.status == data.diff.status", &event));
    assert!(holds("data.diff.status == changes.status", &event));
    assert!(!holds("changes.status == data.other", &event));
    assert!(!holds("changes == data.diff", &event));
    assert!(holds("changes.other.new == data.other", &event));
}

#[test]
fn events_whose_data_is_not_an_object() {
    let text = EntityEvent::new(EventKind::Custom, "Note", "1", json!("hello"), None);
    assert!(holds(
        "data == 'hello' && data.x == null && data contains 'ell'",
        &text
    ));
    assert!(!holds("has_field('x')", &text));
    let list = EntityEvent::new(EventKind::Custom, "List", "1", json!([1, [2]]), None);
    assert!(holds(
        "data[0] == 1 && data[1][0] == 2 && data[2] == null",
        &list
    ));
    assert!(holds(
        "has_field('1') && !has_field('2') && !has_field('x')",
        &list
    ));
    assert!(holds("event_type == 'CUSTOM' && changes != null", &list));
    assert!(!holds("changes contains '0'", &list));
}
