#compdef cxrdiff

_cxrdiff_completion() {
  eval $(env _TYPER_COMPLETE_ARGS="${words[1,$CURRENT]}" _CXRDIFF_COMPLETE=complete_zsh cxrdiff)
}

compdef _cxrdiff_completion cxrdiff