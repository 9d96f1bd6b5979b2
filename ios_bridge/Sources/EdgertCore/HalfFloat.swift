/// IEEE half-precision bits without `Float16` (unavailable on Intel Macs): the causal mask's
/// values (0 and -1e4) as Core ML's fp16 input takes them.
public enum HalfFloat {
    /// The half-precision bits of `value`, rounded to nearest; too small: signed zero; too
    /// large: infinity.
    public static func bits(_ value: Float) -> UInt16 {
        let bits = value.bitPattern
        let sign = UInt16(truncatingIfNeeded: (bits >> 16) & 0x8000)
        let exponent = Int((bits >> 23) & 0xFF) - 127 + 15
        if exponent <= 0 {
            return sign
        }
        if exponent >= 31 {
            return sign | 0x7C00
        }
        let combined = (UInt32(exponent) << 23 | (bits & 0x7F_FFFF)) + 0x1000
        let half = min(combined >> 13, 0x7C00)
        return sign | UInt16(truncatingIfNeeded: half)
    }
}
