//! Tests of the point codec.
//!
//! Hand-checked wire layouts pin the byte and word orders to what real
//! devices put on the wire; property tests then cover every data type in every
//! order over its full value range, and check that decoding never panics
//! whatever a device returns. The rest are the write rules: scale and offset,
//! enum labels, limits and access, each refusal with a reason.

use super::*;
use proptest::prelude::*;

mod exact;

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// A read-write point at address 0 with the defaults: scale 1, offset 0, no
/// labels, no limits, big-endian words and bytes.
fn point(table: Table, data_type: DataType) -> Point {
    Point {
        path: "test.value".to_string(),
        location: Location { table, address: 0, bit: None },
        data_type,
        word_order: Order::Big,
        byte_order: Order::Big,
        scale: 1.0,
        offset: 0.0,
        labels: Vec::new(),
        access: Access::ReadWrite,
        min: None,
        max: None,
        allowed: Vec::new(),
        deadband: 0.0,
        trigger: false,
    }
}

/// A holding-register point with the defaults.
fn holding(data_type: DataType) -> Point {
    point(Table::HoldingRegister, data_type)
}

/// A holding-register point with the given word and byte order.
fn ordered(data_type: DataType, word_order: Order, byte_order: Order) -> Point {
    Point { word_order, byte_order, ..holding(data_type) }
}

/// A holding-register point with a scale and an offset.
fn scaled(data_type: DataType, scale: f64, offset: f64) -> Point {
    Point { scale, offset, ..holding(data_type) }
}

/// The point with enum labels.
fn labelled(p: Point, labels: &[(&str, i64)]) -> Point {
    let labels = labels.iter().map(|&(name, raw)| Label { name: name.to_string(), raw }).collect();
    Point { labels, ..p }
}

/// A coil point.
fn coil() -> Point {
    point(Table::Coil, DataType::Bool)
}

/// A point for bit `bit` of holding register 0.
fn register_bit(bit: u8) -> Point {
    let mut p = holding(DataType::Bool);
    p.location.bit = Some(bit);
    p
}

fn text(s: &str) -> Value {
    Value::Text(s.to_string())
}

/// The registers a write produces; fails the test with the reason if refused.
fn words_for(p: &Point, value: Value) -> Vec<u16> {
    match p.encode(&value) {
        Ok(Encoded::Words(w)) => w,
        other => panic!("expected registers for {value:?}, got {other:?}"),
    }
}

/// The reason a write is refused; fails the test if it is accepted.
fn refusal(p: &Point, value: Value) -> String {
    match p.encode(&value) {
        Err(reason) => reason,
        Ok(encoded) => panic!("expected {value:?} to be refused, it encoded to {encoded:?}"),
    }
}

/// The value read from `words`; fails the test if decoding fails.
fn decoded(p: &Point, words: &[u16]) -> Value {
    p.decode_words(words).unwrap_or_else(|e| panic!("decoding {words:04X?} failed: {e}"))
}

/// The four (word order, byte order) combinations, named as the manuals name them.
const ORDERS: [(&str, Order, Order); 4] = [
    ("ABCD", Order::Big, Order::Big),
    ("CDAB", Order::Little, Order::Big),
    ("BADC", Order::Big, Order::Little),
    ("DCBA", Order::Little, Order::Little),
];

/// Reference layout, written independently of the codec: split big-endian
/// bytes into registers, swap the bytes in each register for little byte
/// order, reverse the registers for little word order.
fn layout(big_endian: &[u8], word_order: Order, byte_order: Order) -> Vec<u16> {
    let mut words: Vec<u16> = big_endian
        .chunks(2)
        .map(|c| match byte_order {
            Order::Big => u16::from_be_bytes([c[0], c[1]]),
            Order::Little => u16::from_le_bytes([c[0], c[1]]),
        })
        .collect();
    if word_order == Order::Little {
        words.reverse();
    }
    words
}

fn order() -> impl Strategy<Value = Order> {
    prop_oneof![Just(Order::Big), Just(Order::Little)]
}

fn table() -> impl Strategy<Value = Table> {
    prop_oneof![Just(Table::Coil), Just(Table::DiscreteInput), Just(Table::InputRegister), Just(Table::HoldingRegister)]
}

fn access() -> impl Strategy<Value = Access> {
    prop_oneof![Just(Access::Read), Just(Access::Write), Just(Access::ReadWrite)]
}

/// Every data type, strings of any length up to 64 (including the degenerate 0).
fn data_type() -> impl Strategy<Value = DataType> {
    prop_oneof![
        Just(DataType::Bool),
        Just(DataType::U16),
        Just(DataType::I16),
        Just(DataType::U32),
        Just(DataType::I32),
        Just(DataType::F32),
        Just(DataType::U64),
        Just(DataType::I64),
        Just(DataType::F64),
        (0u16..=64).prop_map(|len| DataType::String { len }),
    ]
}

/// Any value a twin adapter could hand over, including NaN, infinities,
/// extremes and non-ASCII text.
fn any_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::Int),
        (-100_000i64..100_000).prop_map(Value::Int),
        any::<u64>().prop_map(Value::UInt),
        any::<f64>().prop_map(Value::Float),
        (-100_000.0..100_000.0f64).prop_map(Value::Float),
        Just(Value::Float(f64::NAN)),
        Just(Value::Float(f64::INFINITY)),
        any::<String>().prop_map(Value::Text),
        "[a-z ]{0,10}".prop_map(Value::Text),
    ]
}

/// Any point, including configurations the config layer should refuse
/// (a bit of a coil, bit 200, a negative scale): the codec must still not panic.
fn any_point() -> impl Strategy<Value = Point> {
    (
        (table(), data_type(), order(), order(), access()),
        prop::option::of(any::<u8>()),
        prop::sample::select(vec![1.0, 0.1, 0.01, -0.5, 10.0, 1e-9, 1e9]),
        prop::sample::select(vec![0.0, -40.0, 0.5, -273.15, 1e12]),
        prop::collection::vec(("[a-z]{1,5}", -3i64..70_000), 0..4),
        (prop::option::of(-1e6..1e6f64), prop::option::of(-1e6..1e6f64)),
    )
        .prop_map(|(shape, bit, scale, offset, labels, (min, max))| {
            let (table, data_type, word_order, byte_order, access) = shape;
            let (min, max) = (min.map(Number::Float), max.map(Number::Float));
            let mut p = Point { word_order, byte_order, scale, offset, access, min, max, ..point(table, data_type) };
            p.location.bit = bit;
            p.labels = labels.into_iter().map(|(name, raw)| Label { name, raw }).collect();
            p
        })
}

// ---------------------------------------------------------------------------
// Wire layouts, checked by hand
// ---------------------------------------------------------------------------

#[test]
fn f32_big_endian_matches_the_modbus_convention() {
    // 42.5 = 0x422A0000 in IEEE 754.
    let p = holding(DataType::F32);
    assert_eq!(words_for(&p, Value::Float(42.5)), vec![0x422A, 0x0000]);
    assert_eq!(decoded(&p, &[0x422A, 0x0000]), Value::Float(42.5));
}

#[test]
fn f32_little_word_order_swaps_the_registers() {
    let p = ordered(DataType::F32, Order::Little, Order::Big);
    assert_eq!(words_for(&p, Value::Float(42.5)), vec![0x0000, 0x422A]);
    assert_eq!(decoded(&p, &[0x0000, 0x422A]), Value::Float(42.5));
}

#[test]
fn f32_little_byte_order_swaps_the_bytes_inside_each_register() {
    let p = ordered(DataType::F32, Order::Big, Order::Little);
    assert_eq!(words_for(&p, Value::Float(42.5)), vec![0x2A42, 0x0000]);
    assert_eq!(decoded(&p, &[0x2A42, 0x0000]), Value::Float(42.5));
}

#[test]
fn f32_fully_little_endian_swaps_both() {
    let p = ordered(DataType::F32, Order::Little, Order::Little);
    assert_eq!(words_for(&p, Value::Float(42.5)), vec![0x0000, 0x2A42]);
    assert_eq!(decoded(&p, &[0x0000, 0x2A42]), Value::Float(42.5));
}

#[test]
fn u32_layouts_are_abcd_cdab_badc_dcba() {
    let expected: [[u16; 2]; 4] = [
        [0x1234, 0x5678], // ABCD
        [0x5678, 0x1234], // CDAB
        [0x3412, 0x7856], // BADC
        [0x7856, 0x3412], // DCBA
    ];
    for ((name, word, byte), regs) in ORDERS.into_iter().zip(expected) {
        let p = ordered(DataType::U32, word, byte);
        assert_eq!(words_for(&p, Value::Int(0x1234_5678)), regs, "{name}");
        assert_eq!(decoded(&p, &regs), Value::Int(0x1234_5678), "{name}");
    }
}

#[test]
fn u64_layouts_in_all_four_orders_match_the_hand_checked_registers() {
    let expected: [[u16; 4]; 4] = [
        [0x0102, 0x0304, 0x0506, 0x0708], // ABCD…
        [0x0708, 0x0506, 0x0304, 0x0102], // registers reversed
        [0x0201, 0x0403, 0x0605, 0x0807], // bytes swapped in each register
        [0x0807, 0x0605, 0x0403, 0x0201], // fully little-endian
    ];
    for ((name, word, byte), regs) in ORDERS.into_iter().zip(expected) {
        let p = ordered(DataType::U64, word, byte);
        assert_eq!(words_for(&p, Value::UInt(0x0102_0304_0506_0708)), regs, "{name}");
        assert_eq!(decoded(&p, &regs), Value::Int(0x0102_0304_0506_0708), "{name}");
    }
}

#[test]
fn i64_layouts_in_all_four_orders_match_the_hand_checked_registers() {
    // -2 = 0xFFFF_FFFF_FFFF_FFFE: only the least significant byte differs.
    let expected: [[u16; 4]; 4] = [
        [0xFFFF, 0xFFFF, 0xFFFF, 0xFFFE],
        [0xFFFE, 0xFFFF, 0xFFFF, 0xFFFF],
        [0xFFFF, 0xFFFF, 0xFFFF, 0xFEFF],
        [0xFEFF, 0xFFFF, 0xFFFF, 0xFFFF],
    ];
    for ((name, word, byte), regs) in ORDERS.into_iter().zip(expected) {
        let p = ordered(DataType::I64, word, byte);
        assert_eq!(words_for(&p, Value::Int(-2)), regs, "{name}");
        assert_eq!(decoded(&p, &regs), Value::Int(-2), "{name}");
    }
}

#[test]
fn f64_layouts_in_all_four_orders_match_the_hand_checked_registers() {
    // 1.0 = 0x3FF0_0000_0000_0000.
    let expected: [[u16; 4]; 4] = [
        [0x3FF0, 0x0000, 0x0000, 0x0000],
        [0x0000, 0x0000, 0x0000, 0x3FF0],
        [0xF03F, 0x0000, 0x0000, 0x0000],
        [0x0000, 0x0000, 0x0000, 0xF03F],
    ];
    for ((name, word, byte), regs) in ORDERS.into_iter().zip(expected) {
        let p = ordered(DataType::F64, word, byte);
        assert_eq!(words_for(&p, Value::Float(1.0)), regs, "{name}");
        assert_eq!(decoded(&p, &regs), Value::Float(1.0), "{name}");
    }
}

#[test]
fn i16_minus_one_is_all_ones() {
    let p = holding(DataType::I16);
    assert_eq!(words_for(&p, Value::Int(-1)), vec![0xFFFF]);
    assert_eq!(decoded(&p, &[0xFFFF]), Value::Int(-1));
    assert_eq!(words_for(&p, Value::Int(i64::from(i16::MIN))), vec![0x8000]);
}

#[test]
fn the_same_register_reads_as_unsigned_on_a_u16_point() {
    assert_eq!(decoded(&holding(DataType::U16), &[0xFFFF]), Value::Int(65_535));
}

#[test]
fn i32_minus_two_is_sign_extended_across_both_registers() {
    let p = holding(DataType::I32);
    assert_eq!(words_for(&p, Value::Int(-2)), vec![0xFFFF, 0xFFFE]);
    assert_eq!(decoded(&p, &[0xFFFF, 0xFFFE]), Value::Int(-2));
}

#[test]
fn word_order_does_not_change_a_single_register_but_byte_order_does() {
    for (name, word, byte) in ORDERS {
        let expected = if byte == Order::Big { 0x1234 } else { 0x3412 };
        let p = ordered(DataType::U16, word, byte);
        assert_eq!(words_for(&p, Value::Int(0x1234)), vec![expected], "{name}");
    }
}

#[test]
fn a_string_is_packed_two_characters_per_register_and_nul_padded() {
    let p = holding(DataType::String { len: 5 });
    assert_eq!(words_for(&p, text("AB C")), vec![0x4142, 0x2043, 0x0000]);
    assert_eq!(decoded(&p, &[0x4142, 0x2043, 0x0000]), text("AB C"));
}

#[test]
fn a_string_with_little_byte_order_puts_the_first_character_in_the_low_byte() {
    let p = ordered(DataType::String { len: 4 }, Order::Big, Order::Little);
    assert_eq!(words_for(&p, text("ABCD")), vec![0x4241, 0x4443]);
    assert_eq!(decoded(&p, &[0x4241, 0x4443]), text("ABCD"));
}

#[test]
fn a_string_read_stops_at_the_first_nul_and_drops_trailing_spaces() {
    let p = holding(DataType::String { len: 6 });
    assert_eq!(decoded(&p, &[0x4142, 0x0043, 0x4445]), text("AB"));
    assert_eq!(decoded(&p, &[0x4142, 0x2020, 0x2020]), text("AB"));
}

#[test]
fn a_string_read_is_never_longer_than_the_point_length() {
    // Odd length: the pad byte of the last register is not part of the text,
    // even when the device put something other than NUL there.
    let p = holding(DataType::String { len: 5 });
    assert_eq!(decoded(&p, &[0x4142, 0x4344, 0x4546]), text("ABCDE"));
}

#[test]
fn a_bool_register_reads_any_non_zero_value_as_true_and_writes_one() {
    let p = holding(DataType::Bool);
    assert_eq!(decoded(&p, &[0]), Value::Bool(false));
    assert_eq!(decoded(&p, &[1]), Value::Bool(true));
    assert_eq!(decoded(&p, &[0x8000]), Value::Bool(true));
    assert_eq!(words_for(&p, Value::Bool(true)), vec![1]);
    assert_eq!(words_for(&p, Value::Bool(false)), vec![0]);
}

#[test]
fn a_coil_reads_and_writes_a_single_bit() {
    let p = coil();
    assert_eq!(p.decode_bits(&[true]), Ok(Value::Bool(true)));
    assert_eq!(p.decode_bits(&[false, true]), Ok(Value::Bool(false)));
    assert_eq!(p.encode(&Value::Bool(true)), Ok(Encoded::Bits(vec![true])));
    assert_eq!(p.encode(&Value::Bool(false)), Ok(Encoded::Bits(vec![false])));
}

#[test]
fn a_discrete_input_reads_as_a_bool_and_refuses_writes_when_read_only() {
    let p = Point { access: Access::Read, ..point(Table::DiscreteInput, DataType::Bool) };
    assert_eq!(p.decode_bits(&[true]), Ok(Value::Bool(true)));
    assert!(refusal(&p, Value::Bool(true)).contains("read-only"));
}

// ---------------------------------------------------------------------------
// Round trips in every order, over the full range of each type
// ---------------------------------------------------------------------------

proptest! {
    #[test]
    fn bool_registers_round_trip_in_every_order(v in any::<bool>(), w in order(), b in order()) {
        let p = ordered(DataType::Bool, w, b);
        let regs = words_for(&p, Value::Bool(v));
        prop_assert_eq!(&regs, &layout(&u16::from(v).to_be_bytes(), w, b));
        prop_assert_eq!(decoded(&p, &regs), Value::Bool(v));
    }

    #[test]
    fn u16_round_trips_in_every_order(v in any::<u16>(), w in order(), b in order()) {
        let p = ordered(DataType::U16, w, b);
        let regs = words_for(&p, Value::Int(v.into()));
        prop_assert_eq!(&regs, &layout(&v.to_be_bytes(), w, b));
        prop_assert_eq!(decoded(&p, &regs), Value::Int(v.into()));
    }

    #[test]
    fn i16_round_trips_in_every_order(v in any::<i16>(), w in order(), b in order()) {
        let p = ordered(DataType::I16, w, b);
        let regs = words_for(&p, Value::Int(v.into()));
        prop_assert_eq!(&regs, &layout(&v.to_be_bytes(), w, b));
        prop_assert_eq!(decoded(&p, &regs), Value::Int(v.into()));
    }

    #[test]
    fn u32_round_trips_in_every_order(v in any::<u32>(), w in order(), b in order()) {
        let p = ordered(DataType::U32, w, b);
        let regs = words_for(&p, Value::Int(v.into()));
        prop_assert_eq!(&regs, &layout(&v.to_be_bytes(), w, b));
        prop_assert_eq!(decoded(&p, &regs), Value::Int(v.into()));
    }

    #[test]
    fn i32_round_trips_in_every_order(v in any::<i32>(), w in order(), b in order()) {
        let p = ordered(DataType::I32, w, b);
        let regs = words_for(&p, Value::Int(v.into()));
        prop_assert_eq!(&regs, &layout(&v.to_be_bytes(), w, b));
        prop_assert_eq!(decoded(&p, &regs), Value::Int(v.into()));
    }

    #[test]
    fn f32_round_trips_bit_exactly_in_every_order(
        v in any::<u32>().prop_map(f32::from_bits).prop_filter("finite", |f| f.is_finite()),
        w in order(),
        b in order(),
    ) {
        let p = ordered(DataType::F32, w, b);
        let regs = words_for(&p, Value::Float(v.into()));
        prop_assert_eq!(&regs, &layout(&v.to_be_bytes(), w, b));
        let Value::Float(back) = decoded(&p, &regs) else { panic!("an f32 point must read as a float") };
        prop_assert_eq!((back as f32).to_bits(), v.to_bits());
    }

    #[test]
    fn u64_round_trips_in_every_order(v in any::<u64>(), w in order(), b in order()) {
        let p = ordered(DataType::U64, w, b);
        let regs = words_for(&p, Value::UInt(v));
        prop_assert_eq!(&regs, &layout(&v.to_be_bytes(), w, b));
        let expected = i64::try_from(v).map_or(Value::UInt(v), Value::Int);
        let back = decoded(&p, &regs);
        prop_assert_eq!(&back, &expected);
        // What was read can be written back unchanged.
        prop_assert_eq!(words_for(&p, back), regs);
    }

    #[test]
    fn i64_round_trips_in_every_order(v in any::<i64>(), w in order(), b in order()) {
        let p = ordered(DataType::I64, w, b);
        let regs = words_for(&p, Value::Int(v));
        prop_assert_eq!(&regs, &layout(&v.to_be_bytes(), w, b));
        prop_assert_eq!(decoded(&p, &regs), Value::Int(v));
    }

    #[test]
    fn f64_round_trips_bit_exactly_in_every_order(
        v in any::<u64>().prop_map(f64::from_bits).prop_filter("finite", |f| f.is_finite()),
        w in order(),
        b in order(),
    ) {
        let p = ordered(DataType::F64, w, b);
        let regs = words_for(&p, Value::Float(v));
        prop_assert_eq!(&regs, &layout(&v.to_be_bytes(), w, b));
        let Value::Float(back) = decoded(&p, &regs) else { panic!("an f64 point must read as a float") };
        prop_assert_eq!(back.to_bits(), v.to_bits());
    }

    #[test]
    fn strings_round_trip_in_every_order(
        (len, s) in (1u16..=40).prop_flat_map(|len| (Just(len), proptest::string::string_regex(&format!("[ -~]{{0,{len}}}")).unwrap())),
        w in order(),
        b in order(),
    ) {
        let p = ordered(DataType::String { len }, w, b);
        let regs = words_for(&p, text(&s));
        prop_assert_eq!(regs.len(), usize::from(len.div_ceil(2)));
        // Trailing spaces are padding on the device side, so they are dropped on read.
        prop_assert_eq!(decoded(&p, &regs), text(s.trim_end()));
    }

    #[test]
    fn every_register_pattern_survives_a_read_then_a_write_back(
        t in prop_oneof![
            Just(DataType::U16), Just(DataType::I16), Just(DataType::U32), Just(DataType::I32),
            Just(DataType::F32), Just(DataType::U64), Just(DataType::I64), Just(DataType::F64),
        ],
        regs in prop::collection::vec(any::<u16>(), 4),
        w in order(),
        b in order(),
    ) {
        let p = ordered(t, w, b);
        let regs = &regs[..usize::from(t.registers())];
        let value = decoded(&p, regs);
        // NaN and infinities are read faithfully but can never be written.
        prop_assume!(value.as_f64().is_some_and(f64::is_finite));
        prop_assert_eq!(words_for(&p, value), regs.to_vec());
    }

    #[test]
    fn integer_writes_are_accepted_exactly_when_the_value_fits_the_type(
        v in prop_oneof![any::<i64>(), -70_000i64..70_000, Just(i64::MIN), Just(i64::MAX)],
        w in order(),
        b in order(),
    ) {
        let cases = [
            (DataType::U16, u16::try_from(v).is_ok()),
            (DataType::I16, i16::try_from(v).is_ok()),
            (DataType::U32, u32::try_from(v).is_ok()),
            (DataType::I32, i32::try_from(v).is_ok()),
            (DataType::U64, u64::try_from(v).is_ok()),
            (DataType::I64, true),
        ];
        for (t, fits) in cases {
            let p = ordered(t, w, b);
            match p.encode(&Value::Int(v)) {
                Ok(Encoded::Words(regs)) => {
                    prop_assert!(fits, "{v} was accepted by a {}", t.name());
                    prop_assert_eq!(decoded(&p, &regs), Value::Int(v));
                }
                Ok(other) => prop_assert!(false, "unexpected {other:?}"),
                Err(reason) => {
                    prop_assert!(!fits, "{v} was refused by a {}: {reason}", t.name());
                    prop_assert!(reason.contains("does not fit"), "{reason}");
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Scale and offset
// ---------------------------------------------------------------------------

#[test]
fn a_scaled_reading_is_the_exact_decimal_value() {
    let p = scaled(DataType::I16, 0.1, 0.0);
    // 215 × 0.1 is 21.500000000000004 in floating point; the twin must see 21.5.
    assert_eq!(decoded(&p, &[215]), Value::Float(21.5));
    assert_eq!(decoded(&p, &[(-215i16) as u16]), Value::Float(-21.5));
    assert_eq!(decoded(&p, &[3]), Value::Float(0.3));
}

#[test]
fn a_scaled_write_is_divided_back_to_the_raw_value() {
    let p = scaled(DataType::I16, 0.1, 0.0);
    assert_eq!(words_for(&p, Value::Float(21.5)), vec![215]);
    assert_eq!(words_for(&p, Value::Float(-21.5)), vec![(-215i16) as u16]);
    assert_eq!(words_for(&p, Value::Int(21)), vec![210]);
    assert_eq!(words_for(&p, Value::Float(0.3)), vec![3]);
}

#[test]
fn a_write_between_two_steps_of_the_scale_is_refused() {
    let reason = refusal(&scaled(DataType::I16, 0.1, 0.0), Value::Float(21.55));
    assert!(reason.contains("21.55 is between two steps of 0.1: nearest valid values 21.5 and 21.6"), "{reason}");
}

#[test]
fn an_offset_is_added_on_read_and_subtracted_on_write() {
    // A temperature sensor: raw tenths of a degree, offset -40 °C.
    let p = scaled(DataType::U16, 0.1, -40.0);
    assert_eq!(decoded(&p, &[650]), Value::Float(25.0));
    assert_eq!(decoded(&p, &[0]), Value::Float(-40.0));
    assert_eq!(words_for(&p, Value::Float(25.0)), vec![650]);
    assert_eq!(words_for(&p, Value::Int(-40)), vec![0]);
}

#[test]
fn an_offset_alone_makes_the_reading_a_float() {
    let p = scaled(DataType::U16, 1.0, 5.0);
    assert_eq!(decoded(&p, &[10]), Value::Float(15.0));
    assert_eq!(words_for(&p, Value::Int(15)), vec![10]);
}

#[test]
fn an_offset_with_more_decimals_than_the_scale_is_kept_exactly() {
    // Whole kelvins on the device, degrees Celsius in the twin.
    let p = scaled(DataType::U16, 1.0, -273.15);
    assert_eq!(decoded(&p, &[300]), Value::Float(26.85));
    assert_eq!(words_for(&p, Value::Float(26.85)), vec![300]);
}

#[test]
fn a_binary_fraction_scale_is_read_exactly() {
    // 1/8 and 1/256 steps are common fixed-point formats.
    assert_eq!(decoded(&scaled(DataType::I16, 0.125, 0.0), &[1]), Value::Float(0.125));
    assert_eq!(decoded(&scaled(DataType::I16, 1.0 / 256.0, 0.0), &[3]), Value::Float(3.0 / 256.0));
    assert_eq!(words_for(&scaled(DataType::I16, 0.125, 0.0), Value::Float(0.125)), vec![1]);
}

#[test]
fn a_large_scale_reads_whole_multiples() {
    let p = scaled(DataType::U16, 10.0, 0.0);
    assert_eq!(decoded(&p, &[123]), Value::Float(1230.0));
    assert_eq!(words_for(&p, Value::Int(1230)), vec![123]);
    assert!(refusal(&p, Value::Int(1235)).contains("between two steps of 10: nearest valid values 1230 and 1240"));
}

#[test]
fn a_float_point_keeps_its_precision_through_a_calibration_offset() {
    let p = scaled(DataType::F32, 1.0, -0.5);
    let raw = 23.456f32;
    let bits = raw.to_bits();
    let Value::Float(x) = decoded(&p, &[(bits >> 16) as u16, bits as u16]) else { panic!("expected a float") };
    assert!((x - (f64::from(raw) - 0.5)).abs() < 1e-6, "read {x}");
}

#[test]
fn a_scaled_float_reading_has_no_arithmetic_noise() {
    // 215.0 × 0.1 is 21.500000000000004 in floating point.
    let p = scaled(DataType::F32, 0.1, 0.0);
    assert_eq!(decoded(&p, &[0x4357, 0x0000]), Value::Float(21.5));
}

#[test]
fn a_scaled_float_point_divides_on_write() {
    let p = scaled(DataType::F32, 0.1, 0.0);
    assert_eq!(words_for(&p, Value::Float(4.25)), words_for(&holding(DataType::F32), Value::Float(42.5)));
}

#[test]
fn a_write_out_of_the_type_range_after_scaling_is_refused() {
    // 7000 / 0.1 = 70000 does not fit in a u16 even though 7000 does.
    let reason = refusal(&scaled(DataType::U16, 0.1, 0.0), Value::Int(7000));
    assert!(reason.contains("does not fit in a u16"), "{reason}");
    assert!(reason.contains("70000"), "{reason}");
    // Below zero after removing the offset.
    let reason = refusal(&scaled(DataType::U16, 0.1, -40.0), Value::Float(-41.0));
    assert!(reason.contains("does not fit in a u16"), "{reason}");
}

#[test]
fn a_scaled_f32_write_beyond_the_f32_range_is_refused() {
    let reason = refusal(&scaled(DataType::F32, 1e-10, 0.0), Value::Float(1e30));
    assert!(reason.contains("does not fit in an f32"), "{reason}");
    let reason = refusal(&holding(DataType::F32), Value::Float(1e39));
    assert!(reason.contains("does not fit in an f32"), "{reason}");
}

/// Scales and offsets as decimal text, so the exact expected reading can be
/// computed with integers rather than with the floats under test.
const SCALES: [&str; 11] = ["1", "0.1", "0.01", "0.001", "0.5", "0.25", "0.125", "0.0625", "0.2", "2", "10"];
const OFFSETS: [&str; 6] = ["0", "-40", "0.5", "-273.15", "1000", "0.001"];

/// `"-273.15"` → `(-27315, 2)`.
fn decimal(s: &str) -> (i128, u32) {
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    (format!("{int}{frac}").parse().unwrap(), frac.len() as u32)
}

/// The float nearest to raw × scale + offset, computed exactly.
fn exact_reading(raw: i64, scale: &str, offset: &str) -> f64 {
    let ((sm, sk), (om, ok)) = (decimal(scale), decimal(offset));
    let k = sk.max(ok);
    let n = i128::from(raw) * sm * 10i128.pow(k - sk) + om * 10i128.pow(k - ok);
    format!("{n}e-{k}").parse().unwrap()
}

proptest! {
    #[test]
    fn scaled_readings_are_exact_and_write_back_to_the_same_registers(
        (t, raw) in prop_oneof![
            any::<u16>().prop_map(|v| (DataType::U16, i64::from(v))),
            any::<i16>().prop_map(|v| (DataType::I16, i64::from(v))),
            any::<u32>().prop_map(|v| (DataType::U32, i64::from(v))),
            any::<i32>().prop_map(|v| (DataType::I32, i64::from(v))),
        ],
        scale in prop::sample::select(SCALES.to_vec()),
        offset in prop::sample::select(OFFSETS.to_vec()),
        w in order(),
        b in order(),
    ) {
        prop_assume!(scale != "1" || offset != "0");
        let regs = words_for(&ordered(t, w, b), Value::Int(raw));
        let p = Point { scale: scale.parse().unwrap(), offset: offset.parse().unwrap(), ..ordered(t, w, b) };
        let value = decoded(&p, &regs);
        prop_assert_eq!(&value, &Value::Float(exact_reading(raw, scale, offset)));
        prop_assert_eq!(words_for(&p, value), regs);
    }
}

// ---------------------------------------------------------------------------
// Enum labels
// ---------------------------------------------------------------------------

fn on_off_coil() -> Point {
    labelled(coil(), &[("on", 1), ("off", 0)])
}

fn mode_register() -> Point {
    labelled(holding(DataType::U16), &[("auto", 0), ("manual", 1), ("off", 2)])
}

#[test]
fn a_label_is_written_as_its_raw_value() {
    assert_eq!(on_off_coil().encode(&text("on")), Ok(Encoded::Bits(vec![true])));
    assert_eq!(on_off_coil().encode(&text("off")), Ok(Encoded::Bits(vec![false])));
    assert_eq!(words_for(&mode_register(), text("off")), vec![2]);
}

#[test]
fn a_raw_value_is_read_as_its_label() {
    assert_eq!(on_off_coil().decode_bits(&[true]), Ok(text("on")));
    assert_eq!(on_off_coil().decode_bits(&[false]), Ok(text("off")));
    assert_eq!(decoded(&mode_register(), &[1]), text("manual"));
}

#[test]
fn an_unknown_label_is_refused_with_the_valid_labels() {
    let reason = refusal(&on_off_coil(), text("maybe"));
    assert!(reason.contains("\"maybe\""), "{reason}");
    assert!(reason.contains("on, off"), "{reason}");
}

#[test]
fn a_number_for_a_labelled_point_is_refused() {
    let reason = refusal(&mode_register(), Value::Int(1));
    assert!(reason.contains("expected one of: auto, manual, off"), "{reason}");
    assert!(refusal(&on_off_coil(), Value::Bool(true)).contains("expected one of"));
}

#[test]
fn a_raw_value_without_a_label_is_read_as_the_number() {
    assert_eq!(decoded(&mode_register(), &[7]), Value::Int(7));
}

#[test]
fn a_label_whose_raw_value_does_not_fit_the_point_is_refused() {
    let reason = refusal(&labelled(holding(DataType::U16), &[("minus", -1)]), text("minus"));
    assert!(reason.contains("does not fit a u16"), "{reason}");
    let reason = refusal(&labelled(coil(), &[("on", 1), ("both", 2)]), text("both"));
    assert!(reason.contains("does not fit"), "{reason}");
    let reason = refusal(&labelled(register_bit(4), &[("on", 1), ("both", 2)]), text("both"));
    assert!(reason.contains("does not fit"), "{reason}");
}

#[test]
fn labels_are_matched_before_scaling() {
    let p = labelled(scaled(DataType::U16, 0.1, 0.0), &[("idle", 0), ("run", 10)]);
    assert_eq!(decoded(&p, &[10]), text("run"));
    assert_eq!(words_for(&p, text("run")), vec![10]);
    // An unlabelled raw value is still scaled.
    assert_eq!(decoded(&p, &[5]), Value::Float(0.5));
}

// ---------------------------------------------------------------------------
// Limits, access and type checks on writes
// ---------------------------------------------------------------------------

fn setpoint() -> Point {
    Point { min: Some(Number::Int(10)), max: Some(Number::Int(100)), ..holding(DataType::U16) }
}

#[test]
fn a_write_below_the_minimum_is_refused_naming_the_minimum() {
    let reason = refusal(&setpoint(), Value::Int(9));
    assert!(reason.contains("below the minimum 10"), "{reason}");
}

#[test]
fn a_write_above_the_maximum_is_refused_naming_the_maximum() {
    let reason = refusal(&setpoint(), Value::Float(100.5));
    assert!(reason.contains("above the maximum 100"), "{reason}");
}

#[test]
fn writes_at_the_limits_are_accepted() {
    assert_eq!(words_for(&setpoint(), Value::Int(10)), vec![10]);
    assert_eq!(words_for(&setpoint(), Value::Int(100)), vec![100]);
}

#[test]
fn limits_apply_to_the_engineering_value_not_the_raw_one() {
    let p = Point { max: Some(Number::Int(50)), ..scaled(DataType::U16, 0.1, 0.0) };
    assert_eq!(words_for(&p, Value::Float(50.0)), vec![500]);
    assert!(refusal(&p, Value::Float(50.1)).contains("above the maximum 50"));
}

#[test]
fn only_allowed_values_are_accepted_when_a_list_is_given() {
    let p = Point { allowed: vec![Number::Int(1), Number::Int(2), Number::Int(4)], ..holding(DataType::U16) };
    assert_eq!(words_for(&p, Value::Int(4)), vec![4]);
    assert_eq!(words_for(&p, Value::Float(2.0)), vec![2]);
    let reason = refusal(&p, Value::Int(3));
    assert!(reason.contains("not an allowed value; allowed: 1, 2, 4"), "{reason}");
}

#[test]
fn a_bool_point_refuses_numbers_and_text() {
    for p in [coil(), holding(DataType::Bool), register_bit(3)] {
        for value in [Value::Int(1), Value::Float(0.0), Value::UInt(1), text("true")] {
            let reason = refusal(&p, value);
            assert!(reason.contains("expected true or false"), "{reason}");
        }
    }
}

#[test]
fn a_number_point_refuses_bools_and_text() {
    for value in [Value::Bool(true), text("12")] {
        let reason = refusal(&holding(DataType::U16), value);
        assert!(reason.contains("expected a number"), "{reason}");
    }
}

#[test]
fn a_read_only_point_refuses_every_write() {
    let points = [
        Point { access: Access::Read, ..coil() },
        Point { access: Access::Read, ..holding(DataType::U16) },
        Point { access: Access::Read, ..holding(DataType::F64) },
        Point { access: Access::Read, ..holding(DataType::String { len: 8 }) },
        Point { access: Access::Read, ..on_off_coil() },
    ];
    let values = [Value::Bool(true), Value::Int(1), Value::UInt(1), Value::Float(1.0), text("on")];
    for p in &points {
        for value in &values {
            let reason = refusal(p, value.clone());
            assert_eq!(reason, "the point is read-only");
        }
    }
}

#[test]
fn a_read_only_point_still_reads() {
    let p = Point { access: Access::Read, ..holding(DataType::U16) };
    assert_eq!(decoded(&p, &[42]), Value::Int(42));
}

#[test]
fn a_write_only_point_accepts_writes() {
    let p = Point { access: Access::Write, ..holding(DataType::U16) };
    assert_eq!(words_for(&p, Value::Int(1)), vec![1]);
}

#[test]
fn non_finite_numbers_are_refused() {
    for t in [DataType::F32, DataType::F64, DataType::I32] {
        for x in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            let reason = refusal(&holding(t), Value::Float(x));
            assert_eq!(reason, "expected a finite number");
        }
    }
}

#[test]
fn a_string_longer_than_the_point_is_refused() {
    let p = holding(DataType::String { len: 5 });
    assert_eq!(words_for(&p, text("ABCDE")), vec![0x4142, 0x4344, 0x4500]);
    let reason = refusal(&p, text("ABCDEF"));
    assert!(reason.contains("at most 5 characters"), "{reason}");
}

#[test]
fn a_non_ascii_string_is_refused() {
    let reason = refusal(&holding(DataType::String { len: 10 }), text("héllo"));
    assert!(reason.contains("ASCII"), "{reason}");
}

#[test]
fn a_number_for_a_string_point_is_refused() {
    let reason = refusal(&holding(DataType::String { len: 10 }), Value::Int(5));
    assert!(reason.contains("expected a string"), "{reason}");
}

#[test]
fn an_empty_string_is_written_as_nul_registers() {
    assert_eq!(words_for(&holding(DataType::String { len: 4 }), text("")), vec![0, 0]);
}

/// A limit as the configuration holds it once read: an integer when written
/// as one, else a float.
fn limit(text: &str) -> Number {
    match text.parse::<i128>() {
        Ok(i) => Number::Int(i),
        Err(_) => Number::Float(text.parse().unwrap_or_else(|e| panic!("{text}: {e}"))),
    }
}

#[test]
fn a_scaled_write_is_refused_between_steps_and_again_when_its_step_is_above_the_maximum() {
    // The acceptance run's point: this max is refused by `twinbus check`, but the
    // codec must not trust the configuration to have caught it.
    let p = Point { max: Some(limit("10000.006")), ..scaled(DataType::U32, 0.01, 0.0) };
    let reason = refusal(&p, Value::Float(10000.006));
    assert!(reason.contains("between two steps of 0.01: nearest valid values 10000 and 10000.01"), "{reason}");
    assert!(refusal(&p, Value::Float(10000.01)).contains("above the maximum 10000.006"));
    assert_eq!(words_for(&p, Value::Int(10000)), vec![0x000F, 0x4240]);
}

#[test]
fn a_value_within_noise_of_a_step_is_checked_against_the_limits_as_that_step() {
    // One f64 below 0.3: as asked it is within the maximum, but the device
    // would hold the step 0.3, which is above it.
    let p = Point { max: Some(limit("0.29999999999999993")), ..scaled(DataType::U16, 0.1, 0.0) };
    let reason = refusal(&p, Value::Float(0.299_999_999_999_999_93));
    assert!(reason.contains("0.3") && reason.contains("above the maximum 0.29999999999999993"), "{reason}");
}

#[test]
fn i64_limits_at_the_ends_of_the_type_are_compared_exactly() {
    let p = Point {
        min: Some(limit("-9223372036854775808")),
        max: Some(limit("9223372036854775806")),
        ..holding(DataType::I64)
    };
    assert_eq!(words_for(&p, Value::Int(i64::MIN)), vec![0x8000, 0, 0, 0]);
    assert_eq!(words_for(&p, Value::Int(i64::MAX - 1)), vec![0x7FFF, 0xFFFF, 0xFFFF, 0xFFFE]);
    assert!(refusal(&p, Value::Int(i64::MAX)).contains("above the maximum 9223372036854775806"));
}

#[test]
fn a_u64_allowed_list_compares_integers_exactly() {
    let p = Point { allowed: vec![limit("18446744073709551614")], ..holding(DataType::U64) };
    assert_eq!(words_for(&p, Value::UInt(u64::MAX - 1)), vec![0xFFFF, 0xFFFF, 0xFFFF, 0xFFFE]);
    assert!(refusal(&p, Value::UInt(u64::MAX)).contains("not an allowed value"));
}

#[test]
fn a_whole_float_beyond_2_pow_53_on_an_integer_point_is_refused_in_favour_of_an_integer() {
    // 9007199254740994.0 is also what JSON's 9007199254740993.0 becomes.
    let reason = refusal(&holding(DataType::U64), Value::Float(9_007_199_254_740_994.0));
    assert!(reason.contains("as an integer"), "{reason}");
}

#[test]
fn a_string_with_a_nul_character_is_refused() {
    // The device would hold it, but it would read back cut at the NUL.
    let reason = refusal(&holding(DataType::String { len: 8 }), text("AB\0CD"));
    assert!(reason.contains("NUL"), "{reason}");
}

// ---------------------------------------------------------------------------
// Integers: exact, never rounded through a float
// ---------------------------------------------------------------------------

#[test]
fn a_u64_above_i64_max_round_trips_exactly() {
    let p = holding(DataType::U64);
    for v in [u64::MAX, u64::MAX - 1, i64::MAX as u64 + 1, 0xFFFF_FFFF_FFFF_FFF1] {
        let regs = words_for(&p, Value::UInt(v));
        assert_eq!(decoded(&p, &regs), Value::UInt(v), "{v}");
    }
}

#[test]
fn a_u64_up_to_i64_max_reads_as_an_int() {
    let p = holding(DataType::U64);
    let regs = words_for(&p, Value::UInt(i64::MAX as u64));
    assert_eq!(decoded(&p, &regs), Value::Int(i64::MAX));
}

#[test]
fn i64_extremes_round_trip_exactly() {
    let p = holding(DataType::I64);
    assert_eq!(words_for(&p, Value::Int(i64::MIN)), vec![0x8000, 0, 0, 0]);
    for v in [i64::MIN, i64::MAX, i64::MAX - 1, -1] {
        let regs = words_for(&p, Value::Int(v));
        assert_eq!(decoded(&p, &regs), Value::Int(v), "{v}");
    }
}

#[test]
fn integers_are_not_rounded_through_a_float() {
    // 2^53 + 1 is the first integer an f64 cannot hold.
    let v = (1i64 << 53) + 1;
    let p = holding(DataType::I64);
    assert_eq!(decoded(&p, &words_for(&p, Value::Int(v))), Value::Int(v));
}

#[test]
fn a_fractional_number_on_an_integer_type_is_refused() {
    for t in [DataType::U16, DataType::I16, DataType::U32, DataType::I32, DataType::U64, DataType::I64] {
        let reason = refusal(&holding(t), Value::Float(3.5));
        assert!(reason.contains("not a whole number"), "{}: {reason}", t.name());
    }
}

#[test]
fn a_whole_float_on_an_integer_type_is_written_as_the_integer() {
    for t in [DataType::U16, DataType::I16, DataType::U32, DataType::I32, DataType::U64, DataType::I64] {
        let p = holding(t);
        assert_eq!(words_for(&p, Value::Float(3.0)), words_for(&p, Value::Int(3)), "{}", t.name());
    }
    assert_eq!(words_for(&holding(DataType::I16), Value::Float(-3.0)), vec![0xFFFD]);
}

#[test]
fn a_negative_number_on_an_unsigned_type_is_refused() {
    for t in [DataType::U16, DataType::U32, DataType::U64] {
        let reason = refusal(&holding(t), Value::Int(-1));
        assert!(reason.contains("does not fit"), "{}: {reason}", t.name());
    }
}

#[test]
fn a_u64_above_i64_max_is_refused_by_an_i64() {
    let reason = refusal(&holding(DataType::I64), Value::UInt(u64::MAX));
    assert!(reason.contains("does not fit in a i64"), "{reason}");
}

#[test]
fn values_just_outside_each_integer_type_are_refused() {
    let cases = [
        (DataType::U16, -1, 65_536),
        (DataType::I16, -32_769, 32_768),
        (DataType::U32, -1, 1 << 32),
        (DataType::I32, i64::from(i32::MIN) - 1, i64::from(i32::MAX) + 1),
    ];
    for (t, below, above) in cases {
        assert!(refusal(&holding(t), Value::Int(below)).contains("does not fit"), "{}", t.name());
        assert!(refusal(&holding(t), Value::Int(above)).contains("does not fit"), "{}", t.name());
    }
}

#[test]
fn huge_floats_on_integer_types_are_refused() {
    for t in [DataType::U16, DataType::I32, DataType::U64, DataType::I64] {
        let reason = refusal(&holding(t), Value::Float(1e300));
        assert!(reason.contains("does not fit"), "{}: {reason}", t.name());
    }
}

// ---------------------------------------------------------------------------
// A bit of a holding register
// ---------------------------------------------------------------------------

#[test]
fn a_register_bit_reads_only_its_bit() {
    assert_eq!(decoded(&register_bit(2), &[0b0100]), Value::Bool(true));
    assert_eq!(decoded(&register_bit(1), &[0b0100]), Value::Bool(false));
    assert_eq!(decoded(&register_bit(0), &[0xFFFE]), Value::Bool(false));
    assert_eq!(decoded(&register_bit(15), &[0x8000]), Value::Bool(true));
}

#[test]
fn a_register_bit_write_is_a_read_modify_write_of_that_bit() {
    assert_eq!(register_bit(5).encode(&Value::Bool(true)), Ok(Encoded::RegisterBit { bit: 5, value: true }));
    assert_eq!(register_bit(0).encode(&Value::Bool(false)), Ok(Encoded::RegisterBit { bit: 0, value: false }));
}

#[test]
fn a_register_bit_with_labels_reads_and_writes_the_labels() {
    let p = labelled(register_bit(3), &[("open", 1), ("closed", 0)]);
    assert_eq!(decoded(&p, &[0b1000]), text("open"));
    assert_eq!(p.encode(&text("closed")), Ok(Encoded::RegisterBit { bit: 3, value: false }));
}

proptest! {
    #[test]
    fn a_register_bit_reads_the_same_bit_as_a_mask(word in any::<u16>(), bit in 0u8..16) {
        prop_assert_eq!(decoded(&register_bit(bit), &[word]), Value::Bool(word & (1 << bit) != 0));
    }
}

// ---------------------------------------------------------------------------
// Short or malformed reads: an error, never a panic
// ---------------------------------------------------------------------------

#[test]
fn too_few_registers_is_an_error() {
    let reason = holding(DataType::U32).decode_words(&[1]).unwrap_err();
    assert_eq!(reason, "expected 2 registers, the device returned 1");
    assert!(holding(DataType::F64).decode_words(&[1, 2, 3]).is_err());
    assert!(holding(DataType::U16).decode_words(&[]).is_err());
    assert!(holding(DataType::String { len: 5 }).decode_words(&[0x4142, 0x4344]).is_err());
}

#[test]
fn no_register_for_a_register_bit_is_an_error() {
    assert!(register_bit(0).decode_words(&[]).is_err());
}

#[test]
fn no_bits_for_a_coil_is_an_error() {
    assert!(coil().decode_bits(&[]).is_err());
}

#[test]
fn a_bit_number_outside_the_register_is_an_error() {
    assert!(register_bit(16).decode_words(&[0xFFFF]).is_err());
    assert!(register_bit(255).decode_words(&[0xFFFF]).is_err());
}

#[test]
fn extra_registers_are_ignored() {
    assert_eq!(decoded(&holding(DataType::U16), &[7, 8, 9]), Value::Int(7));
}

#[test]
fn a_non_utf8_string_reads_without_failing() {
    assert!(holding(DataType::String { len: 2 }).decode_words(&[0xFFFE]).is_ok());
}

proptest! {
    #[test]
    fn decode_never_panics_whatever_the_device_returns(
        p in any_point(),
        regs in prop::collection::vec(any::<u16>(), 0..40),
        bits in prop::collection::vec(any::<bool>(), 0..4),
    ) {
        let result = p.decode_words(&regs);
        if p.location.bit.is_none() && regs.len() < usize::from(p.data_type.registers()) {
            prop_assert!(result.is_err());
        }
        let _ = p.decode_bits(&bits);
        prop_assert_eq!(p.decode_bits(&bits).is_err(), bits.is_empty());
    }

    #[test]
    fn decode_of_any_type_in_any_order_never_panics(
        t in data_type(),
        w in order(),
        b in order(),
        regs in prop::collection::vec(any::<u16>(), 0..70),
    ) {
        let result = ordered(t, w, b).decode_words(&regs);
        prop_assert_eq!(result.is_ok(), regs.len() >= usize::from(t.registers()));
    }

    #[test]
    fn encode_never_panics_and_produces_exactly_the_point_width(p in any_point(), value in any_value()) {
        match p.encode(&value) {
            Ok(Encoded::Words(regs)) => {
                prop_assert!(p.access.writable());
                prop_assert_eq!(regs.len(), usize::from(p.width()));
            }
            Ok(Encoded::Bits(bits)) => {
                prop_assert!(p.access.writable());
                prop_assert_eq!(p.location.table, Table::Coil);
                prop_assert_eq!(bits.len(), 1);
            }
            Ok(Encoded::RegisterBit { bit, .. }) => {
                prop_assert!(p.access.writable());
                prop_assert_eq!(Some(bit), p.location.bit);
            }
            Err(reason) => {
                prop_assert!(!reason.starts_with("internal"), "{reason}");
                prop_assert!(!reason.is_empty());
            }
        }
        if !p.access.writable() {
            prop_assert!(p.encode(&value).is_err());
        }
    }
}

// ---------------------------------------------------------------------------
// Width and span
// ---------------------------------------------------------------------------

#[test]
fn width_is_the_number_of_registers_of_the_type() {
    let cases = [
        (DataType::Bool, 1),
        (DataType::U16, 1),
        (DataType::I16, 1),
        (DataType::U32, 2),
        (DataType::I32, 2),
        (DataType::F32, 2),
        (DataType::U64, 4),
        (DataType::I64, 4),
        (DataType::F64, 4),
        (DataType::String { len: 1 }, 1),
        (DataType::String { len: 4 }, 2),
        (DataType::String { len: 5 }, 3),
    ];
    for (t, width) in cases {
        let p = holding(t);
        assert_eq!(p.width(), width, "{t:?}");
        assert_eq!(p.data_type.registers(), width, "{t:?}");
    }
}

#[test]
fn bit_points_are_one_wide_whatever_the_type() {
    assert_eq!(coil().width(), 1);
    assert_eq!(point(Table::DiscreteInput, DataType::Bool).width(), 1);
    assert_eq!(point(Table::Coil, DataType::U32).width(), 1);
    assert_eq!(register_bit(7).width(), 1);
}

#[test]
fn span_is_the_first_and_last_address_inclusive() {
    let at = |data_type, address| {
        let mut p = holding(data_type);
        p.location.address = address;
        p
    };
    assert_eq!(at(DataType::U16, 100).span(), (100, 100));
    assert_eq!(at(DataType::F32, 100).span(), (100, 101));
    assert_eq!(at(DataType::U64, 100).span(), (100, 103));
    assert_eq!(at(DataType::String { len: 5 }, 100).span(), (100, 102));
    let mut bit = register_bit(3);
    bit.location.address = 40;
    assert_eq!(bit.span(), (40, 40));
}

#[test]
fn span_does_not_overflow_at_the_top_of_the_address_space() {
    let mut p = holding(DataType::U64);
    p.location.address = u16::MAX;
    assert_eq!(p.span(), (65_535, 65_538));
}

#[test]
fn numbers_in_reasons_are_written_as_a_person_reads_them() {
    // 1e300 written out is 301 digits, and -0.5 lies between -1 and 0, not -0
    // (both found by the bad-input corpus).
    let mut p = holding(DataType::F64);
    p.max = Some(Number::Float(1e300));
    assert_eq!(refusal(&p, Value::Float(1.0000000000000002e300)), "1.0000000000000002e300 is above the maximum 1e300");
    assert_eq!(refusal(&p, Value::Text("x".into())), "expected a number; got \"x\"");
    assert_eq!(
        refusal(&holding(DataType::U64), Value::Float(-0.5)),
        "-0.5 is not a whole number, and a u64 holds whole numbers (nearest valid value 0)"
    );
    assert!(refusal(&holding(DataType::I64), Value::Float(-1e30)).starts_with("-1e30 does not fit in a i64"));
    assert_eq!(Value::Float(2.5e-8).to_string(), "2.5e-8");
    assert_eq!(Value::Float(-0.0).to_string(), "0");
    assert_eq!(Value::Float(123.25).to_string(), "123.25");
}

#[test]
fn an_integer_on_an_f32_point_is_rounded_once_to_its_nearest_f32() {
    // 2^60 + 2^36 + 1 lies just above the midpoint of two f32s; as an f64 it
    // is the midpoint itself, which rounds to even: 2^60, the farther one
    // (found by the `write` fuzz target).
    let p = holding(DataType::F32);
    let n: i64 = (1 << 60) + (1 << 36) + 1;
    let nearest = (1u64 << 60) + (1 << 37);
    // A read gives the f32 as its shortest decimal.
    let read = |x: f32| Value::Float(x.to_string().parse().expect("a float"));
    for value in [Value::Int(n), Value::UInt(n as u64)] {
        assert_eq!(decoded(&p, &words_for(&p, value.clone())), read(nearest as f32), "{value:?}");
    }
    assert_eq!(decoded(&p, &words_for(&p, Value::Int(-n))), read(-(nearest as f32)));
    assert_eq!(nearest as f32, n as f32);
}
