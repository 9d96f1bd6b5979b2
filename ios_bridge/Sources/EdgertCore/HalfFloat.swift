/// IEEE half-precision bits without `Float16` (unavailable on Intel Macs): the causal mask's
/// values (0 and -1e4) and the per-layer embedding rows as Core ML's fp16 inputs take them.
public enum HalfFloat {
    /// The half-precision bits of `value`, rounded to nearest even (as numpy's `astype`),
    /// subnormals kept; too large: infinity; NaN stays NaN.
    public static func bits(_ value: Float) -> UInt16 {
        let bits = value.bitPattern
        let sign = UInt16(truncatingIfNeeded: (bits >> 16) & 0x8000)
        let exponent = Int((bits >> 23) & 0xFF)
        let mantissa = bits & 0x7F_FFFF
        if exponent == 0xFF {
            return sign | 0x7C00 | (mantissa != 0 ? 0x200 : 0)
        }
        let e = exponent - 127 + 15
        if e >= 31 {
            return sign | 0x7C00
        }
        if e <= 0 {  // subnormal half: (1.m) * 2^(e - 15) in units of 2^-24
            if e < -10 {
                return sign
            }
            let full = mantissa | 0x80_0000
            let shift = UInt32(14 - e)
            return sign | UInt16(truncatingIfNeeded: roundShift(full, shift))
        }
        // may carry into the exponent, up to infinity: both are the right answer
        let half = UInt32(e) << 10 | (mantissa >> 13)
        let rest = mantissa & 0x1FFF
        let up = rest > 0x1000 || (rest == 0x1000 && half & 1 == 1)
        return sign | UInt16(truncatingIfNeeded: half + (up ? 1 : 0))
    }

    static func roundShift(_ value: UInt32, _ shift: UInt32) -> UInt32 {
        let kept = value >> shift
        let rest = value & ((1 << shift) - 1)
        let halfway = UInt32(1) << (shift - 1)
        return kept + (rest > halfway || (rest == halfway && kept & 1 == 1) ? 1 : 0)
    }

    /// The Float of half-precision `bits` (exact).
    public static func float(_ bits: UInt16) -> Float {
        let sign: Float = bits & 0x8000 != 0 ? -1 : 1
        let exponent = Int((bits >> 10) & 0x1F)
        let mantissa = Float(bits & 0x3FF)
        switch exponent {
        case 0: return sign * mantissa * 0x1p-24
        case 31: return mantissa == 0 ? sign * .infinity : .nan
        default: return sign * (1 + mantissa / 1024) * Float(sign: .plus, exponent: exponent - 15,
                                                              significand: 1)
        }
    }
}
