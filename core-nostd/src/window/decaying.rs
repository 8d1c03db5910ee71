//! Exponentially decaying windows: recent values weigh more, old ones fade.
//!
//! With decay factor λ ∈ (0, 1) the window holds, after values x₁ … x_t,
//!
//! * the decaying sum S_t = Σᵢ λ^i · x_{t−i} = x_t + λ·S_{t−1},
//! * the decaying weight W_t = Σᵢ λ^i = 1 + λ·W_{t−1},
//! * the decaying mean S_t / W_t and the decaying variance
//!   Σᵢ λ^i (x_{t−i} − mean)² / W_t,
//!
//! the mean and variance updated with West's (1979) weighted form of Welford's
//! algorithm, which stays accurate when values are large and close together.
//! A half-life of h values is λ = 2^(−1/h); an EWMA smoothing factor α is
//! λ = 1 − α. Because the mean is normalised by W_t, it is unbiased from the
//! first value on, unlike an EWMA started at zero or at the first value.
//!
//! Memory: five floats and a counter, whatever the stream length.

use super::{Rejection, WindowError, WindowStats, check_finite};

/// Decaying sum, mean and variance of a stream (see the module docs).
///
/// ```
/// use sluice_core::window::DecayingStats;
///
/// let mut d = DecayingStats::from_half_life(1.0).unwrap(); // λ = 0.5
/// d.push(4.0).unwrap();
/// d.push(2.0).unwrap();
/// assert_eq!(d.decaying_sum(), 4.0); // 2 + 0.5 · 4
/// assert_eq!(d.weight(), 1.5);
/// assert!((d.mean().unwrap() - 8.0 / 3.0).abs() < 1e-12);
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct DecayingStats {
    lambda: f64,
    weight: f64,
    sum: f64,
    mean: f64,
    /// Decayed sum of weighted squared deviations.
    m2: f64,
    count: u64,
}

impl DecayingStats {
    /// Decay factor λ ∈ (0, 1): each new value multiplies older weights by λ.
    pub fn new(lambda: f64) -> Result<Self, WindowError> {
        if !(lambda > 0.0 && lambda < 1.0) {
            return Err(WindowError::BadDecay);
        }
        Ok(Self {
            lambda,
            weight: 0.0,
            sum: 0.0,
            mean: 0.0,
            m2: 0.0,
            count: 0,
        })
    }

    /// The weight of a value halves every `half_life` values.
    pub fn from_half_life(half_life: f64) -> Result<Self, WindowError> {
        if !(half_life > 0.0 && half_life.is_finite()) {
            return Err(WindowError::BadDecay);
        }
        Self::new(libm::exp2(-1.0 / half_life))
    }

    /// An EWMA with smoothing factor α ∈ (0, 1): λ = 1 − α.
    pub fn from_alpha(alpha: f64) -> Result<Self, WindowError> {
        Self::new(1.0 - alpha)
    }

    /// The decay factor λ.
    pub fn lambda(&self) -> f64 {
        self.lambda
    }

    /// Adds a value; refuses NaN and infinities.
    #[inline]
    pub fn push(&mut self, value: f64) -> Result<(), Rejection> {
        check_finite(value)?;
        self.weight = self.lambda * self.weight + 1.0;
        self.sum = self.lambda * self.sum + value;
        self.m2 *= self.lambda;
        let delta = value - self.mean;
        self.mean += delta / self.weight;
        self.m2 += delta * (value - self.mean);
        self.count += 1;
        Ok(())
    }

    /// Values added.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The decaying sum S_t.
    pub fn decaying_sum(&self) -> f64 {
        self.sum
    }

    /// The decaying weight W_t (tends to 1/(1 − λ)).
    pub fn weight(&self) -> f64 {
        self.weight
    }

    /// The decaying mean, once a value has been added.
    pub fn mean(&self) -> Option<f64> {
        (self.count > 0).then_some(self.mean)
    }

    /// The decaying (population) variance, once a value has been added.
    pub fn variance(&self) -> Option<f64> {
        (self.count > 0).then(|| (self.m2 / self.weight).max(0.0))
    }

    /// The decaying standard deviation, once a value has been added.
    pub fn stddev(&self) -> Option<f64> {
        self.variance().map(crate::math::sqrt)
    }
}

/// [`DecayingStats`] as a window: counts refused values like the other
/// windows do. It never closes; read it whenever a result is wanted.
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct DecayingWindow {
    stats: DecayingStats,
    counts: WindowStats,
}

impl DecayingWindow {
    /// See [`DecayingStats::new`].
    pub fn new(lambda: f64) -> Result<Self, WindowError> {
        Ok(Self::from_stats(DecayingStats::new(lambda)?))
    }

    /// See [`DecayingStats::from_half_life`].
    pub fn from_half_life(half_life: f64) -> Result<Self, WindowError> {
        Ok(Self::from_stats(DecayingStats::from_half_life(half_life)?))
    }

    fn from_stats(stats: DecayingStats) -> Self {
        Self {
            stats,
            counts: WindowStats::default(),
        }
    }

    /// Adds a value; refuses (and counts) NaN and infinities.
    #[inline]
    pub fn push(&mut self, value: f64) -> Result<(), Rejection> {
        match self.stats.push(value) {
            Ok(()) => {
                self.counts.accepted += 1;
                Ok(())
            }
            Err(why) => self.counts.reject(why),
        }
    }

    /// The decaying statistics.
    pub fn current(&self) -> &DecayingStats {
        &self.stats
    }

    /// Counts of what happened to the values offered so far.
    pub fn stats(&self) -> WindowStats {
        self.counts
    }
}
