//! Piece sizing as upstream does it: a task is cut into pieces of one fixed length (the last
//! piece may be shorter), at most [`MAX_PIECE_COUNT`] of them unless the length is clamped.

/// The smallest piece length, and the size at or under which a file is one piece.
pub const MIN_PIECE_LENGTH: u64 = 4 * 1024 * 1024;

/// The largest piece length.
pub const MAX_PIECE_LENGTH: u64 = 64 * 1024 * 1024;

/// The piece count the computed piece length aims for.
pub const MAX_PIECE_COUNT: u64 = 500;

/// Why a piece length or number was rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PieceError {
    #[error("piece length {0} is out of range: it must be between 4MiB and 64MiB")]
    LengthOutOfRange(u64),
    #[error("piece {number} is out of range: the task has {count} pieces")]
    NumberOutOfRange { number: u32, count: u32 },
}

/// Checks a piece length given by a user or a remote peer.
pub fn validate_piece_length(length: u64) -> Result<u64, PieceError> {
    if (MIN_PIECE_LENGTH..=MAX_PIECE_LENGTH).contains(&length) {
        Ok(length)
    } else {
        Err(PieceError::LengthOutOfRange(length))
    }
}

/// The piece length upstream derives from a content length: the next power of two of
/// `content_length / 500`, clamped to 4 MiB..=64 MiB.
pub fn piece_length_for(content_length: u64) -> u64 {
    let target = (content_length / MAX_PIECE_COUNT).max(1);
    target
        .checked_next_power_of_two()
        .unwrap_or(MAX_PIECE_LENGTH)
        .clamp(MIN_PIECE_LENGTH, MAX_PIECE_LENGTH)
}

/// How a task of known length is cut into pieces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PieceLayout {
    pub content_length: u64,
    pub piece_length: u64,
}

impl PieceLayout {
    /// A layout with the given piece length, or upstream's computed length when `None`.
    pub fn new(content_length: u64, piece_length: Option<u64>) -> Self {
        PieceLayout {
            content_length,
            piece_length: piece_length.unwrap_or_else(|| piece_length_for(content_length)),
        }
    }

    /// Number of pieces; an empty task has none.
    pub fn piece_count(&self) -> u32 {
        self.content_length.div_ceil(self.piece_length) as u32
    }

    /// Byte offset of piece `number`.
    pub fn offset(&self, number: u32) -> u64 {
        number as u64 * self.piece_length
    }

    /// Length of piece `number` (the last one may be short).
    pub fn length(&self, number: u32) -> Result<u64, PieceError> {
        let count = self.piece_count();
        if number >= count {
            return Err(PieceError::NumberOutOfRange { number, count });
        }
        let offset = self.offset(number);
        Ok(self.piece_length.min(self.content_length - offset))
    }

    /// Offset and length of piece `number`.
    pub fn range(&self, number: u32) -> Result<(u64, u64), PieceError> {
        Ok((self.offset(number), self.length(number)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1024 * 1024;

    #[test]
    fn piece_length_table() {
        let cases = [
            (0, 4 * MIB),
            (1, 4 * MIB),
            (4 * MIB, 4 * MIB),
            (2000 * MIB, 4 * MIB),
            (2001 * MIB, 8 * MIB),
            (4000 * MIB, 8 * MIB),
            (10 * 1024 * MIB, 32 * MIB),
            (1024 * 1024 * MIB, 64 * MIB),
            (u64::MAX, 64 * MIB),
        ];
        for (content_length, expected) in cases {
            assert_eq!(
                piece_length_for(content_length),
                expected,
                "len {content_length}"
            );
        }
    }

    #[test]
    fn layout_edges() {
        let cases: [(u64, u32, u64); 5] = [
            (0, 0, 0),
            (1, 1, 1),
            (4 * MIB - 1, 1, 4 * MIB - 1),
            (4 * MIB, 1, 4 * MIB),
            (4 * MIB + 1, 2, 1),
        ];
        for (len, count, last) in cases {
            let layout = PieceLayout::new(len, None);
            assert_eq!(layout.piece_count(), count, "len {len}");
            if count > 0 {
                assert_eq!(layout.length(count - 1).unwrap(), last);
            }
            assert!(layout.length(count).is_err());
        }
    }

    #[test]
    fn pieces_cover_the_content_exactly() {
        for len in [1u64, 17, 4 * MIB + 3, 100 * MIB, 3 * 1024 * MIB + 5] {
            let layout = PieceLayout::new(len, None);
            let mut next = 0;
            for n in 0..layout.piece_count() {
                let (offset, length) = layout.range(n).unwrap();
                assert_eq!(offset, next);
                assert!(length > 0 && length <= layout.piece_length);
                next = offset + length;
            }
            assert_eq!(next, len);
        }
    }

    #[test]
    fn validates_user_piece_length() {
        assert!(validate_piece_length(4 * MIB).is_ok());
        assert!(validate_piece_length(64 * MIB).is_ok());
        assert_eq!(
            validate_piece_length(MIB),
            Err(PieceError::LengthOutOfRange(MIB))
        );
        assert!(validate_piece_length(65 * MIB).is_err());
    }
}
