"""Butcher tableaus of the explicit FSAL Runge-Kutta pairs: Euler, Bogacki-Shampine 3(2),
Tsitouras 5(4)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Tableau:
    """Butcher tableau of an explicit FSAL Runge-Kutta pair (last stage = f at the new point)."""

    a: tuple[tuple[float, ...], ...]
    b_error: tuple[float, ...]
    order: int
    error_order: int


# Euler, with its difference to the trapezoidal rule, h/2 (k_new - k), as the error estimate:
# one evaluation of f per step. At h = 1 a step is one fixed-point iteration z <- f(z).
EULER = Tableau(a=((1.0,),), b_error=(-1 / 2, 1 / 2), order=1, error_order=1)

# Bogacki-Shampine 3(2).
BS3 = Tableau(
    a=((1 / 2,), (0.0, 3 / 4), (2 / 9, 1 / 3, 4 / 9)),
    b_error=(2 / 9 - 7 / 24, 1 / 3 - 1 / 4, 4 / 9 - 1 / 3, -1 / 8),
    order=3,
    error_order=2,
)

# Tsitouras 5(4) (Tsitouras 2011, Comput. Math. Appl. 62:770).
_TSIT5_B = (
    0.09646076681806523,
    0.01,
    0.4798896504144996,
    1.379008574103742,
    -3.290069515436081,
    2.324710524099774,
)
TSIT5 = Tableau(
    a=(
        (0.161,),
        (-0.008480655492356989, 0.335480655492357),
        (2.897153057105493, -6.359448489975075, 4.3622954328695815),
        (5.325864828439257, -11.748883564062828, 7.4955393428898365, -0.09249506636175525),
        (
            5.86145544294642,
            -12.92096931784711,
            8.159367898576159,
            -0.071584973281401,
            -0.028269050394068383,
        ),
        _TSIT5_B,
    ),
    b_error=(
        0.09646076681806523 - 0.09468075576583946,
        0.01 - 0.009183565540343254,
        0.4798896504144996 - 0.4877705284247616,
        1.379008574103742 - 1.234297566930479,
        -3.290069515436081 + 2.7077123499835256,
        2.324710524099774 - 1.866628418170587,
        -1 / 66,
    ),
    order=5,
    error_order=4,
)
