"""Light curves: preprocessing, periodograms, folded views and the periodic-variable classifier."""
