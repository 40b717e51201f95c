//! The `#[task]` attribute.
//!
//! ```ignore
//! use celery_worker::prelude::*;
//!
//! #[task]
//! async fn add(x: i64, y: i64) -> i64 { x + y }
//!
//! #[task(max_retries = 5, retry_backoff = true, queue = "io")]
//! async fn fetch(ctx: TaskContext, url: String) -> Result<String, TaskError> {
//!     Err(ctx.retry(None))
//! }
//! // add::new(2, 3) is a Signature; add(2, 3) is still the plain function.
//! ```
//!
//! Options: `name`, `queue`, `schedule` (beat runs it periodically: a `Schedule`, a
//! `Result<Schedule, _>`, a `Duration` or a crontab string), `max_retries`, `retry_backoff` (true or a factor in seconds),
//! `retry_backoff_max`, `retry_jitter`, `autoretry`, `default_retry_delay`, `time_limit`,
//! `soft_time_limit` (seconds), `rate_limit` (`"10/s"`), `rate_scope` (`"worker"`, the default,
//! or `"cluster"`: one bucket for every worker), `key_concurrency` (at most N tasks of one
//! concurrency key at once, cluster-wide), `acks_late`, `ignore_result`.
#![forbid(unsafe_code)]
#![warn(missing_docs, unreachable_pub)]

use proc_macro::TokenStream;
use proc_macro2::{Span, TokenStream as TokenStream2};
use quote::{format_ident, quote, quote_spanned};
use syn::parse::Parser;
use syn::punctuated::Punctuated;
use syn::spanned::Spanned;
use syn::{Expr, ExprLit, FnArg, ItemFn, Lit, Meta, Pat, ReturnType, Token, Type};

/// Turns a function into a registered task. See the crate docs for the options.
#[proc_macro_attribute]
pub fn task(attr: TokenStream, item: TokenStream) -> TokenStream {
    match expand(attr.into(), item.into()) {
        Ok(ts) => ts.into(),
        Err(e) => e.to_compile_error().into(),
    }
}

#[derive(Default)]
struct Opts {
    name: Option<String>,
    schedule: Option<Expr>,
    fields: Vec<TokenStream2>,
}

fn lit_f64(e: &Expr, key: &str) -> syn::Result<f64> {
    match e {
        Expr::Lit(ExprLit { lit: Lit::Int(i), .. }) => Ok(i.base10_parse::<u64>()? as f64),
        Expr::Lit(ExprLit { lit: Lit::Float(f), .. }) => f.base10_parse::<f64>(),
        _ => Err(syn::Error::new(e.span(), format!("`{key}` takes a number of seconds"))),
    }
}

fn lit_bool(e: &Expr, key: &str) -> syn::Result<bool> {
    match e {
        Expr::Lit(ExprLit { lit: Lit::Bool(b), .. }) => Ok(b.value),
        _ => Err(syn::Error::new(e.span(), format!("`{key}` takes true or false"))),
    }
}

fn lit_str(e: &Expr, key: &str) -> syn::Result<String> {
    match e {
        Expr::Lit(ExprLit { lit: Lit::Str(s), .. }) => Ok(s.value()),
        _ => Err(syn::Error::new(e.span(), format!("`{key}` takes a string"))),
    }
}

fn parse_opts(attr: TokenStream2) -> syn::Result<Opts> {
    let metas = Punctuated::<Meta, Token![,]>::parse_terminated.parse2(attr)?;
    let mut o = Opts::default();
    for m in metas {
        let key = m.path().get_ident().map(|i| i.to_string()).unwrap_or_default();
        let value = match &m {
            Meta::Path(_) => None,
            Meta::NameValue(nv) => Some(&nv.value),
            Meta::List(l) => return Err(syn::Error::new(l.span(), "expected `key = value` or a flag")),
        };
        let flag = |v: Option<&Expr>| -> syn::Result<bool> { v.map(|e| lit_bool(e, &key)).unwrap_or(Ok(true)) };
        let need = |v: Option<&Expr>| -> syn::Result<Expr> {
            v.cloned().ok_or_else(|| syn::Error::new(m.span(), format!("`{key}` needs a value")))
        };
        let field = match key.as_str() {
            "name" => {
                o.name = Some(lit_str(&need(value)?, &key)?);
                continue;
            }
            "schedule" => {
                o.schedule = Some(need(value)?);
                continue;
            }
            "queue" => {
                let q = lit_str(&need(value)?, &key)?;
                quote!(queue: ::core::option::Option::Some(#q))
            }
            "max_retries" => {
                let e = need(value)?;
                let n = match &e {
                    Expr::Lit(ExprLit { lit: Lit::Int(i), .. }) => i.base10_parse::<u32>()?,
                    _ => return Err(syn::Error::new(e.span(), "`max_retries` takes an integer")),
                };
                quote!(max_retries: #n)
            }
            "retry_backoff" => {
                let f = match value {
                    None => 1.0,
                    Some(Expr::Lit(ExprLit { lit: Lit::Bool(b), .. })) => {
                        if b.value {
                            1.0
                        } else {
                            continue;
                        }
                    }
                    Some(e) => lit_f64(e, &key)?,
                };
                quote!(retry_backoff: ::core::option::Option::Some(#f))
            }
            "retry_backoff_max" => {
                let f = lit_f64(&need(value)?, &key)?;
                quote!(retry_backoff_max: #f)
            }
            "default_retry_delay" => {
                let f = lit_f64(&need(value)?, &key)?;
                quote!(default_retry_delay: #f)
            }
            "time_limit" | "soft_time_limit" => {
                let f = lit_f64(&need(value)?, &key)?;
                let id = format_ident!("{}", key);
                quote!(#id: ::core::option::Option::Some(#f))
            }
            "rate_limit" => {
                let s = lit_str(&need(value)?, &key)?;
                quote!(rate_limit: ::core::option::Option::Some(#s))
            }
            "rate_scope" => {
                let s = lit_str(&need(value)?, &key)?;
                if s != "worker" && s != "cluster" {
                    return Err(syn::Error::new(m.path().span(), "`rate_scope` is \"worker\" or \"cluster\""));
                }
                quote!(rate_scope: ::core::option::Option::Some(#s))
            }
            "key_concurrency" => {
                let n = match need(value)? {
                    Expr::Lit(ExprLit { lit: Lit::Int(i), .. }) => i.base10_parse::<u32>()?,
                    e => return Err(syn::Error::new(e.span(), "`key_concurrency` takes an integer")),
                };
                if n == 0 || n > 10_000 {
                    return Err(syn::Error::new(m.path().span(), "`key_concurrency` is 1 to 10000"));
                }
                quote!(key_concurrency: ::core::option::Option::Some(#n))
            }
            "retry_jitter" | "autoretry" | "acks_late" | "ignore_result" => {
                let b = flag(value)?;
                let id = format_ident!("{}", key);
                quote!(#id: #b)
            }
            _ => {
                return Err(syn::Error::new(
                    m.path().span(),
                    format!(
                        "unknown task option `{key}`; expected one of name, queue, schedule, max_retries, \
                         retry_backoff, retry_backoff_max, retry_jitter, autoretry, default_retry_delay, \
                         time_limit, soft_time_limit, rate_limit, rate_scope, key_concurrency, acks_late, ignore_result"
                    ),
                ))
            }
        };
        o.fields.push(field);
    }
    Ok(o)
}

fn last_ident(ty: &Type) -> Option<String> {
    match ty {
        Type::Path(p) => p.path.segments.last().map(|s| s.ident.to_string()),
        Type::Reference(r) => last_ident(&r.elem),
        _ => None,
    }
}

/// For `Result<T, E>` returns `T`.
fn result_ok_type(ty: &Type) -> Option<Type> {
    let Type::Path(p) = ty else { return None };
    let seg = p.path.segments.last()?;
    if seg.ident != "Result" {
        return None;
    }
    let syn::PathArguments::AngleBracketed(a) = &seg.arguments else {
        return None;
    };
    a.args.iter().find_map(|g| match g {
        syn::GenericArgument::Type(t) => Some(t.clone()),
        _ => None,
    })
}

/// The path of celery-core as the calling crate sees it: directly, or through celery-worker.
fn core_path() -> TokenStream2 {
    use proc_macro_crate::{crate_name, FoundCrate};
    let named = |name: &str| {
        let id = format_ident!("{}", name.replace('-', "_"));
        quote!(::#id)
    };
    match crate_name("celery-core") {
        Ok(FoundCrate::Itself) => quote!(crate),
        Ok(FoundCrate::Name(n)) => named(&n),
        Err(_) => match crate_name("celery-worker") {
            Ok(FoundCrate::Itself) => quote!(crate::__core),
            Ok(FoundCrate::Name(n)) => {
                let w = named(&n);
                quote!(#w::__core)
            }
            Err(_) => quote!(::celery_core),
        },
    }
}

fn expand(attr: TokenStream2, item: TokenStream2) -> syn::Result<TokenStream2> {
    let core = core_path();
    let opts = parse_opts(attr)?;
    let func: ItemFn = syn::parse2(item)?;
    let sig = &func.sig;
    if !sig.generics.params.is_empty() {
        return Err(syn::Error::new(sig.generics.span(), "a task cannot be generic: its arguments arrive as JSON"));
    }
    let ident = &sig.ident;
    let vis = &func.vis;
    let is_async = sig.asyncness.is_some();
    let name = opts.name.clone().unwrap_or_else(|| ident.to_string());

    let mut has_ctx = false;
    let mut params: Vec<(syn::Ident, Type)> = Vec::new();
    for (i, input) in sig.inputs.iter().enumerate() {
        let FnArg::Typed(pt) = input else {
            return Err(syn::Error::new(input.span(), "a task is a free function, not a method"));
        };
        if i == 0 && last_ident(&pt.ty).as_deref() == Some("TaskContext") {
            has_ctx = true;
            continue;
        }
        let Pat::Ident(pi) = &*pt.pat else {
            return Err(syn::Error::new(pt.pat.span(), "task parameters must be plain names"));
        };
        params.push((pi.ident.clone(), (*pt.ty).clone()));
    }

    let (ret_ty, is_result) = match &sig.output {
        ReturnType::Default => (syn::parse_quote!(()), false),
        ReturnType::Type(_, t) => match result_ok_type(t) {
            Some(ok) => (ok, true),
            None => ((**t).clone(), false),
        },
    };

    let n_params = params.len();
    let names: Vec<_> = params.iter().map(|(i, _)| i.clone()).collect();
    let name_strs: Vec<_> = names.iter().map(|i| i.to_string()).collect();
    let types: Vec<_> = params.iter().map(|(_, t)| t.clone()).collect();
    let indices: Vec<_> = (0..n_params).collect();
    let asserts = types
        .iter()
        .chain(std::iter::once(&ret_ty))
        .map(|t| quote_spanned!(t.span()=> const _: () = #core::__private::assert_task_argument::<#t>();));

    let run_fn = format_ident!("__celery_task_run_{}", ident);
    let opts_fn = format_ident!("__celery_task_options_{}", ident);
    let schedule = opts.schedule.as_ref().map(|expr| {
        let sched_fn = format_ident!("__celery_task_schedule_{}", ident);
        quote! {
            #[doc(hidden)]
            #[allow(non_snake_case)]
            fn #sched_fn() -> ::core::result::Result<#core::schedule::Schedule, #core::schedule::ScheduleError> {
                #core::schedule::IntoSchedule::into_schedule(#expr)
            }

            #core::__private::inventory::submit! {
                #core::schedule::ScheduledTask { task: #name, schedule: #sched_fn }
            }
        }
    });
    let ctx_arg = if has_ctx { quote!(__ctx,) } else { quote!() };
    let call = quote!(#ident(#ctx_arg #(#names),*));
    let wrap = |call: TokenStream2| {
        if is_result {
            quote!(#core::__private::IntoTaskResult::into_task_result(#call))
        } else {
            quote!(#core::__private::IntoTaskResult::into_task_result(#core::task::Plain(#call)))
        }
    };
    let body = if is_async {
        let w = wrap(quote!(#call.await));
        quote!(#w)
    } else {
        let w = wrap(call);
        quote!(#core::__private::run_blocking(move || #w).await)
    };
    let ctx_binding = if has_ctx { quote!(let __ctx = __ctx;) } else { quote!(let _ = __ctx;) };
    let fields = &opts.fields;
    let blocking = !is_async;
    let doc = format!("The `{name}` task: `{ident}::new(..)` builds a signature to send.");
    let span = Span::call_site();

    Ok(quote_spanned! {span=>
        #func

        #[allow(non_camel_case_types)]
        #[doc = #doc]
        #vis struct #ident {
            _private: (),
        }

        #(#asserts)*

        #[allow(non_camel_case_types, clippy::new_ret_no_self, clippy::too_many_arguments, dead_code)]
        impl #ident {
            /// The registered task name.
            pub const NAME: &'static str = #name;

            /// A signature of this task with these arguments.
            pub fn new(#(#names: #types),*) -> #core::Signature {
                let args = ::std::vec![#(
                    #core::__private::serde_json::to_value(&#names).unwrap_or_else(|e| {
                        #core::__private::serde_json::Value::String(::std::format!("<unserializable argument: {e}>"))
                    })
                ),*];
                #core::Signature::by_name(#name).args(#core::__private::serde_json::Value::Array(args))
            }
        }

        impl #core::Task for #ident {
            const NAME: &'static str = #name;
            type Output = #ret_ty;
            fn options() -> #core::TaskOptions {
                #opts_fn()
            }
        }

        #[doc(hidden)]
        #[allow(non_snake_case)]
        fn #opts_fn() -> #core::TaskOptions {
            #core::TaskOptions { #(#fields,)* ..#core::TaskOptions::new(#name) }
        }

        #[doc(hidden)]
        #[allow(non_snake_case, unused_mut)]
        fn #run_fn(
            __ctx: #core::TaskContext,
            mut __args: #core::__private::TaskArgs,
        ) -> #core::task::TaskFuture {
            ::std::boxed::Box::pin(async move {
                #ctx_binding
                if __args.args.len() > #n_params {
                    return ::core::result::Result::Err(#core::TaskError::invalid_arguments(::std::format!(
                        "{} takes {} positional arguments but {} were given", #name, #n_params, __args.args.len()
                    )));
                }
                #(
                    let #names: #types = #core::__private::decode_arg(&mut __args, #indices, #name_strs)?;
                )*
                if let ::core::option::Option::Some(k) = __args.kwargs.keys().next() {
                    return ::core::result::Result::Err(#core::TaskError::invalid_arguments(::std::format!(
                        "{} got an unexpected keyword argument `{}`", #name, k
                    )));
                }
                #body
            })
        }

        #core::__private::inventory::submit! {
            #core::registry::TaskEntry {
                name: #name,
                options: #opts_fn,
                run: #run_fn,
                blocking: #blocking,
            }
        }

        #schedule
    })
}
