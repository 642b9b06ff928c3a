//! Metric series labelled by an enum: one series per value, made when the metric's owner is, and
//! found by the value on the request path, which so never formats or hashes a label. Owns the
//! idiom only; which metrics exist is `stats`'s, which values a label has its enum's.

use std::marker::PhantomData;

use prometheus::core::{MetricVec, MetricVecBuilder};

/// An enum whose values are a label's.
pub trait LabelValue: Copy + 'static {
    /// Every value, in the order `index` numbers them.
    const ALL: &'static [Self];

    /// The label value as series carry it.
    fn as_str(self) -> &'static str;

    /// Its position in `ALL`.
    fn index(self) -> usize;
}

/// One series of a metric family per value of `L`, after the family's other labels.
pub struct Labelled<L, M> {
    series: Box<[M]>,
    label: PhantomData<L>,
}

impl<L: LabelValue, M> Labelled<L, M> {
    /// The series of `family` with `fixed` as its first label values and each value of `L` as
    /// its last.
    pub fn new<B>(family: &MetricVec<B>, fixed: &[&str]) -> Self
    where
        B: MetricVecBuilder<M = M>,
    {
        // `get` finds a value's series by its index: a value listed out of place would count
        // under another value's label.
        debug_assert!(L::ALL.iter().enumerate().all(|(i, value)| value.index() == i), "ALL is in index order");
        let series = L::ALL
            .iter()
            .map(|value| {
                let values: Vec<&str> = fixed.iter().copied().chain([value.as_str()]).collect();
                family.with_label_values(&values)
            })
            .collect();
        Labelled { series, label: PhantomData }
    }

    pub fn get(&self, value: L) -> &M {
        &self.series[value.index()]
    }
}
