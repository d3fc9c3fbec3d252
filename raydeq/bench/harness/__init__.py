"""The machinery every suite shares: settings, timing, memory, problems, models, report."""
