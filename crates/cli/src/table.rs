//! Tables for people: each column as wide as its widest cell, two spaces between columns,
//! the last column unpadded (kubectl's layout).

/// The header and rows, each line ending in a newline.
pub fn render<const N: usize>(header: &[&str; N], rows: &[[String; N]]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let cells: Vec<&str> = cells.collect();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(cell);
                out.push_str(&" ".repeat(widths[i] - cell.chars().count() + 2));
            }
        }
        out.push('\n');
    };
    line(&mut header.iter().copied());
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn columns_are_as_wide_as_their_widest_cell() {
        let rows = [
            ["Workload".to_string(), "shop".into(), "orders".into()],
            ["AuthorizationPolicy".to_string(), "shop".into(), "x".into()],
        ];
        expect_test::expect![[r#"
            KIND                 NAMESPACE  NAME
            Workload             shop       orders
            AuthorizationPolicy  shop       x
        "#]]
        .assert_eq(&super::render(&["KIND", "NAMESPACE", "NAME"], &rows));
    }
}
