//! Metric series labelled by an enum, or by a pair of enums: one series per value, made when the
//! metric's owner is, and found by the value on the request path, which so never formats or
//! hashes a label. Owns the idiom only; which metrics exist is their owners', which values a
//! label has its enum's.

use std::marker::PhantomData;

use prometheus::core::{MetricVec, MetricVecBuilder};

/// An enum whose values are a label's.
pub(crate) trait LabelValue: Copy + 'static {
    /// Every value, in the order `index` numbers them.
    const ALL: &'static [Self];

    /// The label value as series carry it.
    fn as_str(self) -> &'static str;

    /// Its position in `ALL`.
    fn index(self) -> usize;
}

/// Declares an enum whose values are a label's: each variant with the label value its series
/// carry, listed in the order `index` numbers them, and `as_str` on the enum itself.
macro_rules! label_values {
    ($(#[$meta:meta])* $vis:vis enum $name:ident { $( $(#[$vmeta:meta])* $variant:ident = $label:literal, )* }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        $vis enum $name {
            $( $(#[$vmeta])* $variant, )*
        }

        impl $name {
            /// The label value as series carry it.
            #[allow(dead_code, reason = "some enums are only ever labels")]
            pub(crate) fn as_str(self) -> &'static str {
                match self {
                    $( $name::$variant => $label, )*
                }
            }
        }

        impl $crate::labelled::LabelValue for $name {
            const ALL: &'static [$name] = &[$( $name::$variant ),*];

            fn as_str(self) -> &'static str {
                $name::as_str(self)
            }

            fn index(self) -> usize {
                self as usize
            }
        }
    };
}

pub(crate) use label_values;

/// The values of a family's last labels: one enum (`LabelValue`), or a pair of them.
pub(crate) trait Labels: Copy + 'static {
    /// Every combination with its label values, in the order `position` numbers them.
    fn every() -> Vec<(Self, Vec<&'static str>)>;

    /// Its position in `every`.
    fn position(self) -> usize;
}

impl<L: LabelValue> Labels for L {
    fn every() -> Vec<(Self, Vec<&'static str>)> {
        L::ALL.iter().map(|value| (*value, vec![value.as_str()])).collect()
    }

    fn position(self) -> usize {
        self.index()
    }
}

impl<A: LabelValue, B: LabelValue> Labels for (A, B) {
    fn every() -> Vec<(Self, Vec<&'static str>)> {
        A::ALL.iter().flat_map(|a| B::ALL.iter().map(move |b| ((*a, *b), vec![a.as_str(), b.as_str()]))).collect()
    }

    fn position(self) -> usize {
        self.0.index() * B::ALL.len() + self.1.index()
    }
}

/// One series of a metric family per value of `L`, after the family's other labels.
pub(crate) struct Labelled<L, M> {
    series: Box<[M]>,
    label: PhantomData<L>,
}

impl<L, M: Clone> Clone for Labelled<L, M> {
    fn clone(&self) -> Self {
        Labelled { series: self.series.clone(), label: PhantomData }
    }
}

impl<L: Labels, M> Labelled<L, M> {
    /// The series of `family` with `fixed` as its first label values and each value of `L` as
    /// its last.
    pub(crate) fn new<B>(family: &MetricVec<B>, fixed: &[&str]) -> Self
    where
        B: MetricVecBuilder<M = M>,
    {
        let every = L::every();
        // `get` finds a value's series by its position: a value listed out of place would count
        // under another value's label.
        debug_assert!(every.iter().enumerate().all(|(i, (value, _))| value.position() == i), "ALL is in index order");
        let series = every
            .iter()
            .map(|(_, labels)| {
                let values: Vec<&str> = fixed.iter().copied().chain(labels.iter().copied()).collect();
                family.with_label_values(&values)
            })
            .collect();
        Labelled { series, label: PhantomData }
    }

    pub(crate) fn get(&self, value: L) -> &M {
        &self.series[value.position()]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    label_values! {
        enum Colour {
            Red = "red",
            Blue = "blue",
        }
    }

    #[test]
    fn a_pair_of_labels_finds_the_series_of_both_values() {
        let family = prometheus::IntCounterVec::new(prometheus::Opts::new("t", "t"), &["a", "b"]).unwrap();
        let pairs: Labelled<(Colour, Colour), prometheus::IntCounter> = Labelled::new(&family, &[]);
        pairs.get((Colour::Blue, Colour::Red)).inc();
        assert_eq!(family.with_label_values(&["blue", "red"]).get(), 1);
        assert_eq!(family.with_label_values(&["red", "blue"]).get(), 0);
        assert_eq!(<(Colour, Colour)>::every().len(), 4);
    }
}
